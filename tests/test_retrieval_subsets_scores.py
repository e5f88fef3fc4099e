"""Index-size subsets, image scorers and the aesthetic head loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from knn_diffusion.retrieval.config import Scorer
from knn_diffusion.retrieval.scores import (
    LinearAestheticHead,
    colourfulness,
    filter_active,
    image_scores,
    resolve_scorer,
)
from knn_diffusion.retrieval.subsets import subset_mask

FRACTIONS = [0.1, 0.3, 0.5, 0.7, 1.0]  # the paper's index-size ablation


def test_subsets_are_deterministic_nested_and_sized():
    ids = np.arange(20_000, dtype=np.int64) * 13 + 5
    masks = [subset_mask(ids, f, seed=0) for f in FRACTIONS]
    for fraction, mask in zip(FRACTIONS, masks):
        assert mask.mean() == pytest.approx(fraction, abs=0.015)
    for small, large in zip(masks, masks[1:]):
        assert (small <= large).all()  # the 10% subset lies inside the 30% one, and so on
    # Membership depends only on (seed, id): same answer in another order or with other ids around.
    shuffled = np.random.default_rng(1).permutation(len(ids))
    np.testing.assert_array_equal(subset_mask(ids[shuffled], 0.3), masks[1][shuffled])
    np.testing.assert_array_equal(subset_mask(ids[:500], 0.3), masks[1][:500])
    assert (subset_mask(ids, 0.3, seed=1) != masks[1]).any()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        subset_mask(ids, 0.0)


def test_colourfulness_orders_images_by_colour():
    grey = np.full((8, 8, 3), 128, np.uint8)
    pastel = grey.copy()
    pastel[..., 0] = 160
    vivid = np.zeros((8, 8, 3), np.uint8)
    vivid[:4, :, 0] = 255  # half red, half blue
    vivid[4:, :, 2] = 255
    scores = colourfulness(np.stack([grey, pastel, vivid]))
    assert scores[0] == 0 and 0 < scores[1] < scores[2]
    # A uniform pure red: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255^2 + 127.5^2).
    red = np.zeros((1, 4, 4, 4), np.uint8)
    red[..., 0] = red[..., 3] = 255
    assert colourfulness(red)[0] == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-5)
    with pytest.raises(ValueError, match="expected \\(N, H, W, 3\\)"):
        colourfulness(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_aesthetic_head_loads_each_format(tmp_path, suffix):
    weight = np.linspace(-1, 1, 16, dtype=np.float32)[None]  # (1, d)
    bias = np.array([5.0], np.float32)
    path = tmp_path / f"head{suffix}"
    if suffix == ".npz":
        np.savez(path, weight=weight, bias=bias)
    elif suffix == ".safetensors":
        save_file({"weight": weight, "bias": bias}, str(path))
    else:
        torch.save({"linear.weight": torch.from_numpy(weight), "linear.bias": torch.from_numpy(bias)}, path)
    head = LinearAestheticHead.load(path, expected_dim=16)
    embeddings = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(head(embeddings), unit @ weight[0] + 5.0, rtol=1e-5)
    with pytest.raises(ValueError, match="16-d embeddings, the encoder gives 512-d"):
        LinearAestheticHead.load(path, expected_dim=512)


def test_aesthetic_head_refuses_bad_files(tmp_path):
    wrong = tmp_path / "mlp.npz"
    np.savez(wrong, weight=np.zeros((4, 16), np.float32), bias=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="linear head needs"):
        LinearAestheticHead.load(wrong)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="broken.safetensors: cannot read weights"):
        LinearAestheticHead.load(broken)
    pickled = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1, 4), "bias": torch.zeros(1), "extra": object()}, pickled)
    with pytest.raises(ValueError, match="evil.pth: cannot read weights"):  # weights_only refuses objects
        LinearAestheticHead.load(pickled)
    with pytest.raises(ValueError, match="unknown weights format"):
        LinearAestheticHead.load(wrong.rename(tmp_path / "head.bin"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        LinearAestheticHead.load(tmp_path / "missing.npz")


def test_scorer_default_depends_on_weights():
    assert resolve_scorer(Scorer.auto) is Scorer.colourfulness
    assert resolve_scorer(Scorer.auto, "head.pth") is Scorer.laion_aesthetic
    with pytest.raises(ValueError, match="needs index.scorer_weights"):
        resolve_scorer(Scorer.laion_aesthetic)


def test_image_scores_use_the_resolved_scorer(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    by_colour = image_scores(Scorer.auto, image_batches=[images[:4], images[4:]])
    np.testing.assert_allclose(by_colour, colourfulness(images))
    head = tmp_path / "head.npz"
    np.savez(head, weight=np.ones((1, 4), np.float32), bias=np.zeros(1, np.float32))
    embeddings = np.eye(6, 4, dtype=np.float32) + 0.1
    aesthetic = image_scores(Scorer.auto, str(head), embeddings=embeddings)
    np.testing.assert_allclose(aesthetic, LinearAestheticHead.load(head)(embeddings))
    with pytest.raises(ValueError, match="needs the images' CLIP embeddings"):
        image_scores(Scorer.auto, str(head), image_batches=[images])
    assert not filter_active(0.0, 1.0) and filter_active(0.8, 1.0)
