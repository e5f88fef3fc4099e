"""Discrete backbone end to end on tiny real inputs: loss, memorisation, guidance, resume, generator."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from knn_diffusion.models.config import ConditioningConfig
from knn_diffusion.models.discrete.config import (
    DiscreteConfig,
    DiscreteTrainConfig,
    TransformerConfig,
    TransitionConfig,
)
from knn_diffusion.models.discrete.diffusion import DiscreteDiffusion
from knn_diffusion.models.discrete.sampler import guided_log_x0, reverse_schedule, sample_tokens, top_mass
from knn_diffusion.models.discrete.training import train_discrete
from knn_diffusion.training.checkpoint import list_checkpoints, load_weights, read_checkpoint_config
from tests.continuous_helpers import ArrayEmbeddings, ring_neighbours, unit_embeddings

CODES, SIDE, DIM, K = 6, 3, 8, 1
MICRO = {"n_layer": 2, "n_embd": 64, "n_head": 4, "mlp_ratio": 2}


@pytest.fixture
def micro_preset(tmp_path):
    path = tmp_path / "transformer-micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def four_maps() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, CODES, (4, SIDE, SIDE)).astype(np.uint16)


def micro_train_config(preset: str, **changes) -> DiscreteTrainConfig:
    base = dict(preset=preset, k=K, batch_size=16, max_steps=300, lr=3e-3, warmup_steps=10, ema_decay=0.9,
                transition=TransitionConfig(steps=20), checkpoint_every=100, log_every=50, sample_every=0)
    return DiscreteTrainConfig(**{**base, **changes})


def conditions(embeddings: np.ndarray) -> np.ndarray:
    neighbours = ring_neighbours(len(embeddings), K)
    return np.concatenate([embeddings[:, None], embeddings[neighbours]], axis=1)  # (4, 1+K, d)


def test_tiny_model_memorises_four_token_maps_and_samples_them_back(micro_preset, tmp_path):
    maps, embeddings = four_maps(), unit_embeddings(4, DIM)
    logged = {}
    final = train_discrete(micro_train_config(micro_preset), maps, CODES, ArrayEmbeddings(embeddings), np.arange(4),
                           ring_neighbours(4, K), tmp_path / "run", on_log=lambda step, m: logged.update({step: m}))
    assert logged[300]["loss"] < logged[50]["loss"] / 3
    config = read_checkpoint_config(final)
    assert config["backbone"] == "discrete"
    model = DiscreteDiffusion(DiscreteConfig.from_dict(config["model"]))
    load_weights(final, model)
    cond = conditions(embeddings)
    # truncation (r = 0.9) drops the long tail a 300-step model still puts on wrong codes
    for steps, guidance, seeds in ((20, 1.0, [0, 1, 2, 3]), (5, 1.0, [5, 6, 7, 8]), (20, 8.0, [9, 10, 11, 12])):
        tokens = sample_tokens(model.eval(), cond, guidance=guidance, steps=steps, truncation=0.9, seeds=seeds)
        assert np.array_equal(tokens.view(4, SIDE, SIDE).numpy(), maps.astype(np.int64)), (steps, guidance)


def micro_model(seed: int = 0) -> DiscreteDiffusion:
    torch.manual_seed(seed)
    return DiscreteDiffusion(DiscreteConfig(
        transformer=TransformerConfig(**MICRO, num_codes=CODES, height=SIDE, width=SIDE),
        conditioning=ConditioningConfig(embed_dim=DIM, k=K), transition=TransitionConfig(steps=20))).eval()


def test_guidance_one_is_the_conditional_prediction_and_zero_the_null_one():
    model = micro_model()
    x_n = torch.randint(0, CODES + 1, (3, SIDE * SIDE))
    n = torch.tensor([2, 10, 20])
    cond = torch.randn(3, 1 + K, DIM)
    torch.testing.assert_close(guided_log_x0(model, x_n, n, cond, 1.0), model(x_n, n, cond))
    torch.testing.assert_close(guided_log_x0(model, x_n, n, cond, 0.0), model(x_n, n, torch.zeros_like(cond)))
    guided = guided_log_x0(model, x_n, n, cond, 8.0)
    torch.testing.assert_close(guided.exp().sum(1), torch.ones(3, SIDE * SIDE))
    expected = model(x_n, n, torch.zeros_like(cond)) + 8 * (model(x_n, n, cond) - model(x_n, n, torch.zeros_like(cond)))
    torch.testing.assert_close(guided, torch.log_softmax(expected, dim=1))


def test_truncation_keeps_the_top_mass_of_the_conditional_prediction():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3]).view(1, 4, 1)
    assert top_mass(probs.log(), 0.7).view(-1).tolist() == [False, True, False, True]
    assert top_mass(probs.log(), 0.4).view(-1).tolist() == [False, True, False, False]
    assert top_mass(probs.log(), 0.99).view(-1).tolist() == [True, True, True, True]
    model = micro_model()
    x_n, n, cond = torch.full((2, SIDE * SIDE), CODES), torch.tensor([20, 20]), torch.randn(2, 1 + K, DIM)
    kept = top_mass(model(x_n, n, cond), 0.5)
    guided = guided_log_x0(model, x_n, n, cond, 8.0, truncation=0.5)
    assert torch.all(guided.exp()[~kept] < 1e-20)
    torch.testing.assert_close(guided.exp().sum(1), torch.ones(2, SIDE * SIDE))


def test_reverse_schedule_strides_from_n_to_zero():
    assert reverse_schedule(100, 100) == [(n, n - 1) for n in range(100, 0, -1)]
    assert reverse_schedule(100, 4) == [(100, 75), (75, 50), (50, 25), (25, 0)]
    assert reverse_schedule(10, 50)[-1] == (1, 0)


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in():
    model = micro_model()
    cond = torch.randn(3, 1 + K, DIM)
    together = sample_tokens(model, cond, guidance=3.0, steps=5, seeds=[10, 11, 12])
    alone = sample_tokens(model, cond[1:2], guidance=3.0, steps=5, seeds=[11])
    assert torch.equal(together[1:2], alone)


def test_killed_run_resumes_with_the_same_weights(micro_preset, tmp_path):
    maps, embeddings = four_maps(), ArrayEmbeddings(unit_embeddings(4, DIM))
    cfg = micro_train_config(micro_preset, max_steps=8, checkpoint_every=4, log_every=1,
                             timestep_sampling="importance")
    whole = train_discrete(cfg, maps, CODES, embeddings, np.arange(4), ring_neighbours(4, K), tmp_path / "a")
    # a run killed right after its step-4 checkpoint: only that checkpoint is left in its folder
    step4 = list_checkpoints(tmp_path / "a" / "checkpoints")[0]
    assert step4.name.endswith("4")
    shutil.copytree(step4, tmp_path / "b" / "checkpoints" / step4.name)
    resumed = train_discrete(cfg, maps, CODES, embeddings, np.arange(4), ring_neighbours(4, K), tmp_path / "b")
    a, b = micro_model(), micro_model(1)
    load_weights(whole, a, ema=False)
    load_weights(resumed, b, ema=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
