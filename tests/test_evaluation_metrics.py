"""FID, KID, CLIP score and R-precision: checked against hand-computed values and known extremes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from knn_diffusion.encoders.factory import load_open_clip
from knn_diffusion.evaluation import metrics
from knn_diffusion.evaluation.config import BootstrapConfig
from knn_diffusion.evaluation.intervals import interval_columns
from knn_diffusion.evaluation.metrics import (
    EncoderImageFeatures,
    ImageScorer,
    KidSettings,
    Metric,
    clip_score,
    extract_features,
    fid,
    inception_features,
    kid,
    metric_columns,
    r_precision,
)
from knn_diffusion.evaluation.runner import metrics_summary, score_with_intervals, write_table
from tests.continuous_helpers import square_images
from tests.test_encoders import TINY_CLIP


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "tiny-eval-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    return load_open_clip(str(path))


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    return torch.from_numpy(np.random.default_rng(seed).normal(shift, scale, (n, d)))


def hand_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# ---- FID -----------------------------------------------------------------------------------------

def test_fid_is_zero_for_identical_sets_large_for_different_and_symmetric():
    a, b = gaussian(300, 6, 0), gaussian(300, 6, 1, shift=2.0, scale=1.5)
    assert abs(fid(a, a)) < 1e-6
    assert fid(a, b) > 20  # |shift|^2 * d = 24 plus the covariance term
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-6)
    assert fid(a, b) == pytest.approx(hand_fid(a.numpy(), b.numpy()), rel=1e-5)


def test_fid_on_encoder_features_separates_image_sets(tiny_encoder):
    network = EncoderImageFeatures(tiny_encoder)
    squares = square_images(64, 16, seed=0)
    other_squares = square_images(64, 16, seed=1)
    noise = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    f_squares, f_other, f_noise = (extract_features(network, x) for x in (squares, other_squares, noise))
    assert f_squares.shape == (64, 16)
    assert abs(fid(f_squares, f_squares)) < 1e-6
    assert fid(f_squares, f_noise) > 5 * fid(f_squares, f_other)
    assert network.name.startswith("clip_image:") and tiny_encoder.fingerprint.startswith(network.name[11:])


# ---- KID ----------------------------------------------------------------------------------------

def hand_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with torchmetrics' polynomial kernel k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    kernel = lambda p, q: (p @ q.T / d + 1.0) ** 3  # noqa: E731
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off = lambda k: k.sum() - np.trace(k)  # noqa: E731
    return float((off(k_xx) + off(k_yy)) / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2)


def test_kid_equals_hand_computed_unbiased_mmd():
    x, y = gaussian(12, 4, 0), gaussian(12, 4, 1, shift=0.7)
    mean, std = kid(x, y, KidSettings(subsets=5, subset_size=12))  # every subset is the whole set
    assert mean == pytest.approx(hand_kid(x.numpy(), y.numpy()), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    assert hand_kid(x.numpy(), y.numpy()) > 0.1


def test_kid_subsets_are_seeded_and_capped_at_the_smaller_set():
    x, y = gaussian(40, 4, 0), gaussian(30, 4, 1, shift=0.5)
    first = kid(x, y, KidSettings(subsets=20, subset_size=1000, seed=3))
    assert first == kid(x, y, KidSettings(subsets=20, subset_size=1000, seed=3))
    assert first[1] > 0  # subsets of 30 from 40 real features differ
    same_distribution = kid(x, gaussian(30, 4, 2), KidSettings(subsets=20, subset_size=30))
    assert abs(same_distribution[0]) < first[0] / 3


# ---- text alignment -----------------------------------------------------------------------------

def unit(n, d, seed):
    v = np.random.default_rng(seed).normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_r_precision_is_one_when_each_image_is_nearest_its_own_prompt():
    texts = unit(50, 32, 0)
    images = texts + 0.05 * unit(50, 32, 1)
    assert r_precision(images, texts, candidates=20) == 1.0


def test_r_precision_is_chance_for_shuffled_pairs():
    texts = unit(2000, 16, 0)
    images = unit(2000, 16, 1)
    value = r_precision(images, texts, candidates=10, seed=0)
    assert abs(value - 0.1) < 0.025  # 1/R, within ~3.5 standard errors


def test_r_precision_never_draws_the_same_prompt_as_a_distractor():
    texts = unit(3, 8, 0)
    rows = np.repeat(texts, 4, axis=0)                    # 12 images, 3 prompts, 4 times each
    labels = [f"p{i // 4}" for i in range(12)]
    assert r_precision(rows, rows, candidates=3, labels=labels) == 1.0
    with pytest.raises(ValueError, match="R=8 candidates need 7 distractor prompts, only 6 differ"):
        r_precision(rows, rows, candidates=8, labels=[f"p{i // 6}" for i in range(12)])


def test_clip_score_is_the_mean_paired_cosine():
    texts = unit(10, 8, 0)
    assert clip_score(texts, texts) == pytest.approx(1.0)
    assert clip_score(-texts, texts) == pytest.approx(-1.0)
    images = unit(10, 8, 1)
    assert clip_score(images, texts) == pytest.approx(float(np.mean(np.sum(images * texts, axis=1))))


def test_scorer_names_its_feature_and_scores_paired_prompts(tiny_encoder):
    reference = square_images(32, 16, seed=0)
    scorer = ImageScorer(tiny_encoder, reference, kid_settings=KidSettings(subsets=10, subset_size=16),
                         r_candidates=4)
    prompts = [f"prompt {i % 8}" for i in range(32)]
    same = scorer.score(reference, prompts)
    assert set(same) == {"fid", "kid_mean", "kid_std", "clip_score", "r_precision"}
    assert abs(same["fid"]) < 1e-6
    noise = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    assert scorer.score(noise, prompts)["fid"] > 1e-3
    assert scorer.feature == f"clip_image:{tiny_encoder.fingerprint[:16]}"
    with pytest.raises(ValueError, match="3 images for 32 prompts"):
        scorer.score(reference[:3], prompts)


# ---- Inception from a local file ----------------------------------------------------------------

def random_inception_file(path):
    """torch-fidelity's FID Inception with random weights, saved as a state dict (no download)."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   reason="torch-fidelity (torchmetrics[image] extra) is not installed")
    with pytest.MonkeyPatch.context() as mp:  # build the architecture without fetching the real weights
        mp.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)
    return network


def test_inception_loads_a_local_weights_file(tmp_path):
    original = random_inception_file(tmp_path / "inception.pt")
    network = inception_features(tmp_path / "inception.pt")
    assert network.name.startswith("inception_v3_pool3:")
    for name, tensor in original.state_dict().items():
        assert torch.equal(network.state_dict()[name], tensor), name
    features = extract_features(network, square_images(3, 32))
    assert features.shape == (3, 2048) and torch.isfinite(features).all()


def test_inception_refuses_a_wrong_file(tmp_path):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity (torchmetrics[image] extra) is not installed")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not an Inception-v3 FID weights file.*Missing key"):
        inception_features(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt is not an Inception-v3 FID weights file.*: not a torch tensor file"):
        inception_features(tmp_path / "text.pt")


def test_inception_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights: .*nothing.pt: file not found"):
        inception_features(tmp_path / "nothing.pt")


def test_a_new_metric_is_one_entry_and_reaches_the_stage_outputs(tiny_encoder, tmp_path, monkeypatch):
    """A metric added to the table is computed by the scorer and written to points.csv and the metrics
    file; a row that lacks a metric's value is refused, not written blank (the report: test_evaluation_report)."""
    planted = Metric(("mean_feature",), lambda scorer, scored: (float(scored.generated.mean()),))
    monkeypatch.setattr(metrics, "METRICS", [*metrics.METRICS, planted])
    assert metric_columns()[-1] == "mean_feature"
    images = square_images(8, 16, seed=0)
    scorer = ImageScorer(tiny_encoder, images, kid_settings=KidSettings(subsets=2, subset_size=4), r_candidates=2)
    prompts = [f"prompt {i}" for i in range(8)]
    assert list(scorer.score(images, prompts)) == metric_columns()
    scores, _ = score_with_intervals(scorer, images, prompts, 1, BootstrapConfig(resamples=100, set_resamples=20),
                                     tmp_path / "scores")
    row = {"point": "k0-g3", "k": 0, "index_fraction": "-", "guidance": 3.0, "index": "-", **scores}
    write_table(tmp_path / "points.csv", [row])
    header = (tmp_path / "points.csv").read_text().splitlines()[0].split(",")
    assert {*metric_columns(), *interval_columns()} <= set(header)
    assert set(metrics_summary([row])["k0-g3"]) == {*metric_columns(), *interval_columns()}
    with pytest.raises(KeyError, match="mean_feature"):
        write_table(tmp_path / "short.csv", [{key: v for key, v in row.items() if key != "mean_feature"}])
