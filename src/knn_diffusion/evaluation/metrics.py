"""Image quality (FID, KID) and text alignment (CLIP score, CLIP R-precision) of generated images.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``. Both compare
two distributions of *features*, so the feature network decides what the numbers mean:

* Inception-v3 pool3 (the paper's FID) when the user has its weights as a local file;
* otherwise the image tower of a fixed, fingerprinted CLIP encoder (by default the pipeline's own).

Features are extracted once per image set - the reference set's once per evaluation, however many
grid points it scores - and handed to torchmetrics through a pass-through module. Every result names
its feature (``fid_feature``), and values of different features are never comparable.

:data:`METRICS` is the one table of metrics: the scorer computes its entries, and the evaluate stage's
CSV/JSON, its MLflow runs and the ablation report take their columns from :func:`metric_columns`. A new
metric is its function and one entry.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from knn_diffusion.encoders.encoder import Encoder, as_uint8_batch
from knn_diffusion.evaluation.intervals import PointScores, Reference
from knn_diffusion.io import content_sha256

INCEPTION_DIM = 2048


class EncoderImageFeatures(nn.Module):
    """A CLIP encoder's image tower as a feature network: uint8 (N, 3, H, W) -> unit embeddings (N, d)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.num_features = encoder.dim  # torchmetrics reads this instead of probing with a 299 px image
        self.name = f"clip_image:{encoder.fingerprint[:16]}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.encoder.preprocess(images.permute(0, 2, 3, 1))  # (N, 3, S, S)
        return self.encoder.model.encode_image(pixels, normalize=True).float()


def inception_features(weights_path: str | os.PathLike) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (pool3, 2048-d) with weights from a local file, never downloaded.

    The file is torch-fidelity's ``pt_inception-2015-12-05`` state dict; anything else is refused.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.inception_weights: {path}: file not found")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(f"evaluate.inception_weights={path}: the Inception feature network needs "
                                  "torch-fidelity (pip install torch-fidelity); or leave the key empty for CLIP "
                                  "features")
    from torchmetrics.image.fid import NoTrainInceptionV3

    expected = f"evaluate.inception_weights: {path} is not an Inception-v3 FID weights file " \
               "(torch-fidelity's pt_inception-2015-12-05 state dict)"
    try:  # torch-fidelity unpickles without weights_only; only a plain tensor file gets that far
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{expected}: not a torch tensor file ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{expected}: holds a {type(state).__name__}, not a state dict of tensors")
    try:
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
                                     feature_extractor_weights_path=str(path))
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys, wrong shapes
        reason = " ".join(str(err).split())
        raise ValueError(f"{expected}: {reason[:300]}") from None
    network.num_features = INCEPTION_DIM
    network.name = f"inception_v3_pool3:{content_sha256(path)[:16]}"
    return network


@torch.no_grad()
def extract_features(network: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float64 features (N, d), in batches."""
    images = as_uint8_batch(images)
    parts = [network(images[start:start + batch_size].permute(0, 3, 1, 2)).double()  # (B, d)
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts)


class _Precomputed(nn.Identity):
    """Feeds already-extracted features to torchmetrics (which otherwise runs the network itself)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim


@dataclass
class KidSettings:
    subsets: int = 100
    subset_size: int = 50
    seed: int = 0


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, d) and (M, d)."""
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1])).double()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, settings: KidSettings = KidSettings()) -> tuple[float, float]:
    """(mean, std) over random subsets of the unbiased polynomial-kernel MMD^2 between two feature sets.

    The subset size is capped at the smaller set, so small evaluations still get an (unbiased) value.
    """
    size = min(settings.subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=settings.subsets,
                                         subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # the subsets are drawn with torch's global RNG
        torch.manual_seed(settings.seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def clip_cosines(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """(N,) cosine between each image's embedding and its own prompt's text embedding (rows paired)."""
    images, texts = _unit(image_embeddings), _unit(text_embeddings)
    if images.shape != texts.shape:
        raise ValueError(f"clip_score: {images.shape} image embeddings vs {texts.shape} text embeddings")
    return np.einsum("nd,nd->n", images, texts)


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean of :func:`clip_cosines`."""
    return float(clip_cosines(image_embeddings, text_embeddings).mean())


def r_precision_hits(image_embeddings: np.ndarray, text_embeddings: np.ndarray, candidates: int, seed: int = 0,
                     labels: list[str] | None = None) -> np.ndarray:
    """(N,) bool: whether image i's own prompt ranks first among ``candidates`` prompts - its own and
    ``candidates - 1`` distractors drawn from the other rows (CLIP R-precision, Park et al. 2021).

    ``labels`` (default: row numbers) marks rows with the same prompt; those are never distractors.
    Ties count as misses; chance level is ``1 / candidates``.
    """
    images, texts = _unit(image_embeddings), _unit(text_embeddings)
    if images.shape != texts.shape:
        raise ValueError(f"r_precision: {images.shape} image embeddings vs {texts.shape} text embeddings")
    labels = np.asarray(labels if labels is not None else np.arange(len(texts)), dtype=object)
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(images), dtype=bool)
    for i in range(len(images)):
        others = np.flatnonzero(labels != labels[i])
        if len(others) < candidates - 1:
            raise ValueError(f"r_precision: R={candidates} candidates need {candidates - 1} distractor prompts, "
                             f"only {len(others)} differ from prompt {i}")
        distractors = rng.choice(others, candidates - 1, replace=False)
        own = images[i] @ texts[i]
        hits[i] = bool(own > (texts[distractors] @ images[i]).max(initial=-np.inf))
    return hits


def r_precision(image_embeddings: np.ndarray, text_embeddings: np.ndarray, candidates: int, seed: int = 0,
                labels: list[str] | None = None) -> float:
    """The fraction of images whose own prompt ranks first (:func:`r_precision_hits`)."""
    return float(r_precision_hits(image_embeddings, text_embeddings, candidates, seed, labels).mean())


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass
class ScoredSet:
    """What the metrics read of one set of generated images (each part computed once per set)."""

    reference: torch.Tensor       # (M, f) FID/KID features of the reference images
    generated: torch.Tensor       # (N, f) the same features of the generated images
    image_embeddings: np.ndarray  # (N, d) the evaluation encoder's embeddings of the generated images
    text_embeddings: np.ndarray   # (N, d) its embeddings of their prompts (row i: image i's prompt)
    prompts: list[str]


@dataclass(frozen=True)
class Metric:
    """One entry of the metric table: the values it yields, in order, and how (from a scorer's settings and a set)."""

    columns: tuple[str, ...]  # names in the CSV/JSON, MLflow metrics and report columns
    compute: Callable[["ImageScorer", ScoredSet], Sequence[float]]


METRICS: list[Metric] = [
    Metric(("fid",), lambda scorer, s: (fid(s.reference, s.generated),)),
    Metric(("kid_mean", "kid_std"), lambda scorer, s: kid(s.reference, s.generated, scorer.kid_settings)),
    Metric(("clip_score",), lambda scorer, s: (clip_score(s.image_embeddings, s.text_embeddings),)),
    Metric(("r_precision",), lambda scorer, s: (r_precision(s.image_embeddings, s.text_embeddings, scorer.r_candidates,
                                                            scorer.r_seed, labels=s.prompts),)),
]


def metric_columns() -> list[str]:
    """Every value the metric table yields, in table order."""
    return [column for metric in METRICS for column in metric.columns]


class ImageScorer:
    """Scores sets of generated images against one reference set, with one feature network and one CLIP.

    ``encoder`` is the fixed evaluation encoder (CLIP score, R-precision, and the FID/KID features
    unless an Inception ``feature_network`` is given).
    """

    def __init__(self, encoder: Encoder, reference_images: np.ndarray, *, feature_network: nn.Module | None = None,
                 kid_settings: KidSettings = KidSettings(), r_candidates: int = 20, r_seed: int = 0):
        self.encoder = encoder
        self.feature_network = feature_network if feature_network is not None else EncoderImageFeatures(encoder)
        self.reference = extract_features(self.feature_network, reference_images)  # (M, d)
        self.kid_settings = kid_settings
        self.r_candidates = r_candidates
        self.r_seed = r_seed

    @property
    def feature(self) -> str:
        """What FID/KID were computed on: network kind + a fingerprint of its weights."""
        return self.feature_network.name

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """uint8 (N, H, W, 3) images, one per prompt -> {column: value} for every entry of :data:`METRICS`."""
        return self.values(self.scored_set(images, prompts))

    def scored_set(self, images: np.ndarray, prompts: list[str]) -> ScoredSet:
        """What every metric reads of ``images`` (one per prompt): features and embeddings, computed once."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        return ScoredSet(self.reference, extract_features(self.feature_network, images),
                         self.encoder.encode_images(images), self.encoder.encode_texts(prompts), list(prompts))

    def per_image(self, scored: ScoredSet, seeds: int) -> PointScores:
        """The per-image values behind the metrics of a set of ``seeds`` x P images (seed-major)."""
        return PointScores.from_rows(
            clip_cosines(scored.image_embeddings, scored.text_embeddings),
            r_precision_hits(scored.image_embeddings, scored.text_embeddings, self.r_candidates, self.r_seed,
                             labels=scored.prompts),
            scored.generated.numpy(), seeds)

    @functools.cached_property
    def reference_statistics(self) -> Reference:
        """The reference set's statistics every bootstrap resample reuses."""
        return Reference(self.reference.numpy())

    def values(self, scored: ScoredSet) -> dict[str, float]:
        """{column: value} for every entry of :data:`METRICS`."""
        values: dict[str, float] = {}
        for metric in METRICS:
            result = tuple(metric.compute(self, scored))
            if len(result) != len(metric.columns):
                raise ValueError(f"metric {metric.columns}: computed {len(result)} values for {len(metric.columns)} "
                                 "columns")
            values.update(zip(metric.columns, map(float, result)))
        return values
