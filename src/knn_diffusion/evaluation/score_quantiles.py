"""The paper's Fig. 8: the score of generated images follows the score of the neighbours they were
conditioned on.

For a grid point with a per-query score quantile (``retrieval.score_quantile``), each generated image
gets a score from the index's scorer (LAION aesthetic head when its weights are given, else
colourfulness; see :mod:`knn_diffusion.retrieval.scores`), and its conditioning neighbours the mean of
their scores from the index's score column. Both means carry a bootstrap CI over prompts
(:func:`knn_diffusion.evaluation.stats.mean_interval`); the plot draws one point per quantile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from knn_diffusion.evaluation.stats import mean_interval
from knn_diffusion.retrieval.config import Scorer
from knn_diffusion.retrieval.scores import image_scores, resolve_scorer

GENERATED, NEIGHBOURS = "generated_score", "neighbour_score"
COLUMNS = [f"{name}{suffix}" for name in (GENERATED, NEIGHBOURS) for suffix in ("", "_ci_low", "_ci_high")]


def score_quantile_metrics(generated_scores: np.ndarray, neighbour_scores: np.ndarray,
                           seed: int = 0) -> dict[str, float]:
    """Means with CIs of the generated images' scores (N,) and of each image's mean neighbour score (N, k)."""
    generated = mean_interval(np.asarray(generated_scores, np.float64), seed=seed)
    neighbours = mean_interval(np.asarray(neighbour_scores, np.float64).mean(axis=1), seed=seed)
    return {**generated.as_dict(GENERATED), **neighbours.as_dict(NEIGHBOURS)}


def point_score_metrics(records: list[dict], images: np.ndarray,
                        neighbour_scores: Callable[[np.ndarray], np.ndarray] | None, scorer: Scorer | str,
                        weights: str, encoder, seed: int = 0) -> dict[str, float]:
    """:func:`score_quantile_metrics` of a generated grid point: ``records`` from ``generate`` (their
    ``neighbour_ids``), its ``images`` uint8 (N, H, W, 3), the index's score column as a lookup (content
    ids -> scores, from the retrieval backend), and the index's scorer (the aesthetic head reads
    ``encoder``'s image embeddings)."""
    if neighbour_scores is None:
        raise ValueError("a score-quantile grid point needs the index's score column; rebuild the index stage")
    neighbours = neighbour_scores(np.array([r["neighbour_ids"] for r in records], np.int64))
    embeddings = encoder.encode_images(images) if resolve_scorer(scorer, weights) is Scorer.laion_aesthetic else None
    generated = image_scores(scorer, weights, embeddings=embeddings, image_batches=[images])
    return score_quantile_metrics(generated, neighbours, seed)


def plot_score_quantiles(rows: pd.DataFrame, path: str | Path, scorer: str = "score") -> Path:
    """Fig. 8: mean generated score vs mean neighbour score, one marker per quantile (labelled q),
    one line per group of the other settings, 95% CIs as error bars. ``rows``: ``score_quantile``,
    the :data:`COLUMNS`, and optionally ``label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows.copy()
    if "label" not in rows:
        rows["label"] = ""
    figure, ax = plt.subplots(figsize=(5, 3.8), dpi=100)
    for label, group in rows.sort_values("score_quantile").groupby("label", sort=True):
        x, y = group[NEIGHBOURS].to_numpy(), group[GENERATED].to_numpy()
        xerr = [x - group[f"{NEIGHBOURS}_ci_low"], group[f"{NEIGHBOURS}_ci_high"] - x]
        yerr = [y - group[f"{GENERATED}_ci_low"], group[f"{GENERATED}_ci_high"] - y]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=label or None)
        for q, xi, yi in zip(group["score_quantile"], x, y):
            ax.annotate(f"q{int(q)}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"mean {scorer} of the conditioning neighbours")
    ax.set_ylabel(f"mean {scorer} of the generated images")
    ax.set_title("Per-query score quantiles (paper Fig. 8), 95% CI", fontsize=9)
    ax.grid(alpha=0.3)
    if rows["label"].ne("").any():
        ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path
