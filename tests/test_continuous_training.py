"""Training data, checkpoints, exact resume, sampling and the generate() outputs of the continuous model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from knn_diffusion.cli import add_generate_arguments, load_image_embeddings
from knn_diffusion.generation import generate
from knn_diffusion.images import image_grid
from knn_diffusion.models.config import ConditioningVariant
from knn_diffusion.models.continuous.config import ContinuousTrainConfig, SchedulerName
from knn_diffusion.models.continuous.generator import ContinuousGenerator, load_denoiser
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.models.continuous.training import train_continuous
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.checkpoint import read_checkpoint_config, restore_training_state, save_checkpoint
from knn_diffusion.training.data import ConditionedImages, StepBatchSampler
from tests.continuous_helpers import (
    ArrayEmbeddings,
    micro_config,
    ring_neighbours,
    square_images,
    unit_embeddings,
    write_micro_preset,
)

N, D, K, SIDE = 12, 16, 3, 8


@pytest.fixture
def data():
    embeddings = unit_embeddings(N + 5, D)  # the index holds 5 more images than the training set
    self_rows = np.arange(5, N + 5)
    return square_images(N, SIDE), ArrayEmbeddings(embeddings), self_rows, ring_neighbours(N, 4) + 5


def test_dataset_builds_image_and_condition(data):
    images, embeddings, self_rows, neighbours = data
    dataset = ConditionedImages(images, embeddings, self_rows, neighbours, k=K)
    image, cond = dataset[2]
    assert image.shape == (3, SIDE, SIDE) and image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image, torch.from_numpy(images[2]).permute(2, 0, 1).float() / 127.5 - 1)
    assert cond.shape == (1 + K, D)
    assert np.allclose(cond[0], embeddings.array[self_rows[2]])  # f_img(x0) first
    assert np.allclose(cond[1:], embeddings.array[neighbours[2, :K]])  # then knn_img(x0, k)
    with pytest.raises(ValueError, match="k=5 neighbours requested but the neighbour table holds 4"):
        ConditionedImages(images, embeddings, self_rows, neighbours, k=5)
    with pytest.raises(ValueError, match="self_rows has 3 entries for 12 images"):
        ConditionedImages(images, embeddings, self_rows[:3], neighbours, k=K)


def test_sampler_order_is_a_function_of_seed_and_step_and_ranks_split_it():
    full = StepBatchSampler(10, 4, seed=7, start_step=0, stop_step=10)
    batches = list(full)
    assert list(StepBatchSampler(10, 4, seed=7, start_step=6, stop_step=10)) == batches[6:]
    seen = np.concatenate(batches[:5])  # 20 draws = two epochs over 10 items
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    ranks = [list(StepBatchSampler(10, 4, 7, 0, 10, rank=r, world_size=2)) for r in range(2)]
    for step, batch in enumerate(batches):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 DDP ranks"):
        StepBatchSampler(10, 5, 0, 0, 1, rank=0, world_size=2)


def test_checkpoint_roundtrip_rebuilds_model_and_state(tmp_path):
    torch.manual_seed(0)
    config = micro_config(ConditioningVariant.self_attention)
    model = ContinuousDenoiser(config)
    ema = ContinuousDenoiser(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]), torch.randn(2, 4, 16)).square().mean().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "ck", model=model, model_config=config.to_dict(), step=7, ema=ema,
                           optimizer=optimizer, metadata={"note": "x"})
    assert read_checkpoint_config(path)["step"] == 7 and read_checkpoint_config(path)["note"] == "x"
    assert not list(tmp_path.glob(".ck*"))  # nothing half-written left behind

    raw = load_denoiser(path, ema=False)
    assert raw.config == config
    for (name, a), b in zip(model.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(next(load_denoiser(path).parameters()), next(ema.parameters()))

    fresh, fresh_ema = ContinuousDenoiser(config), ContinuousDenoiser(config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert restore_training_state(path, model=fresh, ema=fresh_ema, optimizer=fresh_optimizer) == 7
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_denoiser(tmp_path)


class Killed(Exception):
    pass


def test_killed_run_resumes_with_identical_losses(tmp_path, data):
    images, embeddings, self_rows, neighbours = data
    cfg = ContinuousTrainConfig(preset=write_micro_preset(tmp_path), k=K, batch_size=4, max_steps=8,
                                checkpoint_every=4, log_every=1, sample_every=0, hflip=True, cond_dropout=0.3,
                                warmup_steps=2)
    straight: dict[int, float] = {}
    train_continuous(cfg, images, embeddings, self_rows, neighbours, tmp_path / "a",
                     on_log=lambda step, m: straight.__setitem__(step, m["loss"]))

    def kill_after_six(step, metrics):
        if step == 6:
            raise Killed  # dies after the step-4 checkpoint, two steps later
    with pytest.raises(Killed):
        train_continuous(cfg, images, embeddings, self_rows, neighbours, tmp_path / "b", on_log=kill_after_six)
    resumed: dict[int, float] = {}
    final = train_continuous(cfg, images, embeddings, self_rows, neighbours, tmp_path / "b",
                             on_log=lambda step, m: resumed.__setitem__(step, m["loss"]))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # bit-identical
    a, b = load_denoiser(tmp_path / "a" / "final"), load_denoiser(final)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_training_logs_samples_and_metrics(tmp_path, data):
    images, embeddings, self_rows, neighbours = data
    cfg = ContinuousTrainConfig(preset=write_micro_preset(tmp_path), k=K, batch_size=4, max_steps=4,
                                checkpoint_every=2, keep_checkpoints=1, log_every=2, sample_every=2)
    cfg.sampling.steps = 3
    logs, grids = [], []
    eval_conditions = np.stack([embeddings.get(np.r_[self_rows[i], neighbours[i, :K]]) for i in range(4)])
    final = train_continuous(cfg, images, embeddings, self_rows, neighbours, tmp_path / "run",
                             on_log=lambda s, m: logs.append((s, m)), on_images=lambda s, g: grids.append((s, g)),
                             eval_conditions=eval_conditions)
    assert [s for s, _ in logs] == [2, 4]
    assert set(logs[0][1]) == {"loss", "lr", "images_per_s"} and logs[0][1]["images_per_s"] > 0
    assert [s for s, _ in grids] == [2, 4]
    assert grids[0][1].dtype == np.uint8 and grids[0][1].shape == (2 + 2 * (SIDE + 2), 2 + 2 * (SIDE + 2), 3)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000004"]
    assert read_checkpoint_config(final)["train"]["k"] == K


@pytest.mark.parametrize("scheduler", list(SchedulerName))
def test_sample_is_uint8_and_reproducible_per_image(scheduler):
    torch.manual_seed(0)
    model = ContinuousDenoiser(micro_config()).eval()
    cond = torch.randn(3, 1 + K, D)
    images = sample(model, cond, guidance=3.0, scheduler=scheduler, steps=4, seed=10)
    assert images.shape == (3, SIDE, SIDE, 3) and images.dtype == np.uint8
    alone = sample(model, cond[1:2], guidance=3.0, scheduler=scheduler, steps=4, seed=11)
    assert np.abs(alone[0].astype(int) - images[1].astype(int)).max() <= 1  # image i depends on seed+i only


class WordEncoder:
    """A deterministic text encoder: bag of hashed characters, normalised."""

    def encode_texts(self, texts):
        out = np.zeros((len(texts), D), np.float32)
        for i, text in enumerate(texts):
            for ch in text:
                out[i, ord(ch) % D] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_generate_writes_pngs_grid_and_sidecars(tmp_path):
    torch.manual_seed(0)
    model = ContinuousDenoiser(micro_config()).eval()
    index = unit_embeddings(20, D, seed=3)

    def knn(query, k):
        scores = query @ index.T  # (N, 20) cosine
        ids = np.argsort(-scores, axis=1)[:, :k]
        return ids, np.take_along_axis(scores, ids, 1), index[ids]

    generator = ContinuousGenerator(model, "ddim", run_id="run123")
    records = generate(generator, out_dir=tmp_path / "gen", knn=knn, prompts=["a red apple", "a cat face"],
                       encoder=WordEncoder(), guidance=2.0, steps=3, seed=5, index_sidecar={"sha256": "abc"})
    assert [r["seed"] for r in records] == [5, 6]
    side = json.loads((tmp_path / "gen" / "0001-a-cat-face.json").read_text())
    assert side["prompt"] == "a cat face" and side["model_run_id"] == "run123" and side["index_fingerprint"] == "abc"
    assert len(side["neighbour_ids"]) == K
    assert side["neighbour_scores"] == sorted(side["neighbour_scores"], reverse=True)
    assert np.asarray(Image.open(tmp_path / "gen" / "0001-a-cat-face.png")).shape == (SIDE, SIDE, 3)
    grid_shape = image_grid(np.zeros((2, SIDE, SIDE, 3), np.uint8)).shape
    assert np.asarray(Image.open(tmp_path / "gen" / "grid.png")).shape == grid_shape

    np.save(tmp_path / "query.npy", index[4])
    queries = load_image_embeddings(tmp_path / "query.npy")
    records = generate(ContinuousGenerator(model), out_dir=tmp_path / "var", knn=knn, image_embeddings=queries, steps=2,
                       image_embedding_source="query.npy")
    assert records[0]["prompt"] is None and records[0]["neighbour_ids"][0] == 4  # the image's own row first
    with pytest.raises(ValueError, match="d=8, the model was trained on d=16"):
        generate(ContinuousGenerator(model), out_dir=tmp_path / "bad", knn=knn, image_embeddings=np.ones((1, 8)))
    with pytest.raises(FileNotFoundError, match="expected an existing .npy file"):
        load_image_embeddings(tmp_path / "missing.npy")


def test_generate_arguments_parse():
    import argparse

    args = add_generate_arguments(argparse.ArgumentParser()).parse_args(
        ["a cat", "--k", "5", "--guidance", "8", "--scheduler", "ddim", "--variant", "no_knn", "--seed", "3",
         "--image-embedding-from", "e.npy"])
    assert args.prompts == ["a cat"] and args.k == 5 and args.guidance == 8.0 and args.scheduler == "ddim"
    assert args.variant == "no_knn" and args.image_embedding_from == "e.npy" and args.steps is None
