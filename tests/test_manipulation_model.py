"""The manipulation model: zero-initialised image channels (step 0 = the text-to-image model), and its
fine-tuning in the shared training loop (checkpoints that reload, previews)."""

from __future__ import annotations

import numpy as np
import torch

from knn_diffusion.manipulation.config import ManipulationTrainConfig
from knn_diffusion.manipulation.model import ManipulationDenoiser, WithSource, load_manipulation_model
from knn_diffusion.manipulation.training import EditPairs, train_manipulation
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.checkpoint import list_checkpoints
from tests.continuous_helpers import ArrayEmbeddings, micro_config, ring_neighbours, square_images, unit_embeddings


def text_to_image(seed: int = 0) -> ContinuousDenoiser:
    torch.manual_seed(seed)
    model = ContinuousDenoiser(micro_config())
    with torch.no_grad():  # diffusers zero-initialises the output conv; random weights make the check bite
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_step_zero_reproduces_the_text_to_image_model():
    t2i = text_to_image()
    manip = ManipulationDenoiser(t2i.config, t2i).eval()
    gen = torch.Generator().manual_seed(1)
    noisy, source = torch.randn(4, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    cond = torch.from_numpy(unit_embeddings(16, 16)).reshape(4, 4, 16)
    timesteps = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        expected = t2i(noisy, timesteps, cond)
        assert expected.abs().mean() > 1e-3  # a non-trivial output
        assert torch.allclose(manip(noisy, timesteps, cond, source), expected, atol=1e-6, rtol=0)
    # The same noise and condition through the guided sampler: the same images, whatever the source.
    images = sample(t2i, cond, guidance=3.0, steps=4, seed=0)
    edited = sample(WithSource(manip, source), cond, guidance=3.0, steps=4, seed=0)
    assert np.abs(images.astype(int) - edited.astype(int)).max() <= 1


def small_pairs(count: int = 12, side: int = 8, k: int = 3) -> EditPairs:
    originals, others = square_images(count, side, seed=0), square_images(count, side, seed=1)
    return EditPairs(originals, others, unit_embeddings(count, 16, seed=2), ArrayEmbeddings(unit_embeddings(count, 16)),
                     ring_neighbours(count, k), k)


def test_fine_tuning_runs_in_the_shared_loop_and_reloads(tmp_path):
    t2i = text_to_image()
    cfg = ManipulationTrainConfig(batch_size=4, max_steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    cfg.sampling.steps = 2
    logged, grids = [], []
    final = train_manipulation(cfg, t2i, small_pairs(), tmp_path / "run", on_log=lambda s, m: logged.append(m["loss"]),
                               on_images=lambda s, g: grids.append(g), metadata={"text_to_image_sha256": "abc"})
    model, config = load_manipulation_model(final)
    assert config["backbone"] == "manipulation" and config["text_to_image_sha256"] == "abc" and config["step"] == 4
    assert len(logged) == 4 and all(np.isfinite(logged))
    assert grids and grids[-1].shape[0] == grids[-1].shape[1]  # 3 x 3 tiles: (I_manip | edit | I) rows
    source_weights = model.denoiser.unet.conv_in.weight[:, 3:]
    assert source_weights.abs().max() > 0  # the image channels learned something
    assert list_checkpoints(tmp_path / "run" / "checkpoints")

