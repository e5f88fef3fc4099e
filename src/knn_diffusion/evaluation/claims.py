"""The claims table: each claim of the paper as a difference between two evaluated systems on the same test
prompts and seeds, its paired bootstrap 95% CI and a verdict read off that CI (``stats.verdict``), never
typed in.

A claim names its metric, the sign the paper predicts for ``a - b`` and how to find its two systems among
one backbone's evaluate rows (:func:`knn_diffusion.evaluation.runs.evaluate_runs`). The per-image values
behind both rows (the ``scores/`` artifacts of their MLflow runs) are paired prompt by prompt; rows
without them, or measured on other prompts or seeds, are listed as "not measured" with the reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from knn_diffusion.evaluation.grid import BASELINE
from knn_diffusion.evaluation.intervals import PointScores, Reference, paired_differences
from knn_diffusion.evaluation.stats import verdict
from knn_diffusion.evaluation.tables import at_trained_k, reference_points

# Model sizes from small to large (the architecture presets); other names sort after them, by name.
SIZE_ORDER = ("micro", "tiny", "small", "35M", "100M", "400M")
Pair = tuple[str, pd.Series, pd.Series]  # (what is compared, row a, row b)
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str  # where the paper makes it
    metric: str  # clip_score, r_precision or fid
    sign: int  # the sign the paper predicts for a - b
    pairs: Callable[[pd.DataFrame], list[Pair]]  # one backbone's rows -> the compared rows


def _latest(rows: pd.DataFrame) -> pd.Series | None:
    return None if rows.empty else rows.sort_values(["start_time", "run_id"]).iloc[-1]


def _size_key(size: str) -> tuple[int, str]:
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER), size)


def _main(runs: pd.DataFrame) -> pd.DataFrame:
    """The kNN model (``tokens``, k as trained) at the reference settings."""
    return at_trained_k(reference_points(runs))[lambda r: (r["variant"] == "tokens") & (r["k"] > 0)]


def _pair(label: str, a: pd.DataFrame, b: pd.DataFrame) -> list[Pair]:
    a, b = _latest(a), _latest(b)
    return [] if a is None or b is None else [(label, a, b)]


def knn_vs_no_knn_model(runs: pd.DataFrame) -> list[Pair]:
    """Per model size: the kNN model vs the model trained without kNN (Tab. 1, Fig. 10)."""
    main, points = _main(runs), reference_points(runs)
    no_knn = points[(points["variant"] == "no_knn") & (points["k"] == 0)]
    return [pair for size in sorted(set(main["model_size"]), key=_size_key)
            for pair in _pair(f"tokens vs no_knn, {size}", main[main["model_size"] == size],
                              no_knn[no_knn["model_size"] == size])]


def small_knn_vs_large_no_knn(runs: pd.DataFrame) -> list[Pair]:
    """The smallest kNN model vs the largest model trained without kNN (Fig. 10: 35M kNN beats 400M no-kNN)."""
    main, points = _main(runs), reference_points(runs)
    no_knn = points[(points["variant"] == "no_knn") & (points["k"] == 0)]
    if main.empty or no_knn.empty:
        return []
    small, large = min(main["model_size"], key=_size_key), max(no_knn["model_size"], key=_size_key)
    if small == large:
        return []
    return _pair(f"tokens {small} vs no_knn {large}", main[main["model_size"] == small],
                 no_knn[no_knn["model_size"] == large])


def variants(runs: pd.DataFrame) -> list[Pair]:
    """The paper's conditioning (``tokens``) vs each other kNN variant, same size (Sec. 6.5)."""
    main, trained = _main(runs), at_trained_k(reference_points(runs))
    pairs = []
    for variant in sorted(set(trained["variant"]) - {"tokens", "no_knn"}):
        other = trained[(trained["variant"] == variant) & (trained["k"] > 0)]
        for size in sorted(set(main["model_size"]) & set(other["model_size"]), key=_size_key):
            pairs += _pair(f"tokens vs {variant}, {size}", main[main["model_size"] == size],
                           other[other["model_size"] == size])
    return pairs


def _same_model(rows: pd.DataFrame, like: pd.Series) -> pd.DataFrame:
    """The rows of the evaluate run that ``like`` comes from."""
    return rows[(rows["parent_run_id"] == like["parent_run_id"])]


def within_one_run(compare: Callable[[pd.Series, pd.DataFrame], list[Pair]]) -> Callable[[pd.DataFrame], list[Pair]]:
    """A claim about one model's inference settings: the latest evaluate run of the largest kNN model whose grid
    holds the pair (each study trial evaluates its own slice of the grid; a second, smaller size evaluated later
    must not stand in for the main model)."""
    def pairs(runs: pd.DataFrame) -> list[Pair]:
        main = _main(runs)
        order = main.assign(size_rank=[_size_key(size)[0] for size in main["model_size"]])
        order = order.sort_values(["size_rank", "start_time", "run_id"], ascending=False)
        for _, main in order.iterrows():
            found = compare(main, _same_model(runs, main))
            if found:
                return found
        return []
    pairs.__doc__ = compare.__doc__
    return pairs


def _plain(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[(rows["kind"] == "grid_point") & (rows["score_quantile"].fillna(0) == 0)]


@within_one_run
def knn_at_inference(main: pd.Series, run: pd.DataFrame) -> list[Pair]:
    """The kNN model with its neighbours vs the same model and text embedding alone, k=0 (Fig. 9)."""
    plain = _plain(run)
    none = plain[(plain["k"] == 0) & (plain["guidance"] == main["guidance"])]
    return _pair(f"k={main['k']:g} vs k=0", main.to_frame().T, none)


@within_one_run
def index_fraction(main: pd.Series, run: pd.DataFrame) -> list[Pair]:
    """The full index vs the smallest fraction of it, same k and guidance (Sec. 6.5)."""
    plain = _plain(run)
    same = plain[(plain["k"] == main["k"]) & (plain["guidance"] == main["guidance"])
                 & (plain["index"] == main["index"])]
    low = same["index_fraction"].min()
    if pd.isna(low) or low >= main["index_fraction"]:
        return []
    return _pair(f"fraction {main['index_fraction']:g} vs {low:g}", main.to_frame().T,
                 same[same["index_fraction"] == low])


@within_one_run
def guidance(main: pd.Series, run: pd.DataFrame) -> list[Pair]:
    """The highest guidance scale vs the lowest, k as trained, full own index."""
    plain = _plain(run)
    same = plain[(plain["k"] == main["k"]) & (plain["index"] == main["index"])
                 & (plain["index_fraction"] == main["index_fraction"])]
    high, low = same["guidance"].max(), same["guidance"].min()
    if pd.isna(low) or high == low:
        return []
    return _pair(f"guidance {high:g} vs {low:g}", same[same["guidance"] == high], same[same["guidance"] == low])


@within_one_run
def swapped_index(main: pd.Series, run: pd.DataFrame) -> list[Pair]:
    """Retrieving from another style's index vs the model's own (out-of-distribution generation, Sec. 4)."""
    plain = _plain(run)
    same = plain[(plain["k"] == main["k"]) & (plain["guidance"] == main["guidance"])
                 & (plain["index_fraction"] == main["index_fraction"])]
    return [pair for index in sorted(set(same["index"]) - {main["index"]})
            for pair in _pair(f"index {index} vs {main['index']}", same[same["index"] == index], main.to_frame().T)]


@within_one_run
def model_vs_retrieval(main: pd.Series, run: pd.DataFrame) -> list[Pair]:
    """The kNN model vs its first retrieved image per prompt (Fig. 2: "more faithful to the input text")."""
    return _pair("model vs 1st neighbour", main.to_frame().T, run[run["kind"] == BASELINE])


CLAIMS = [
    Claim("kNN model aligns better with the text than the no-kNN model", "Tab. 1, Sec. 4", "r_precision", +1,
          knn_vs_no_knn_model),
    Claim("kNN model has lower FID than the no-kNN model, at every size", "Tab. 1, Fig. 10", "fid", -1,
          knn_vs_no_knn_model),
    Claim("a small kNN model beats a larger no-kNN model", "Fig. 10", "fid", -1, small_knn_vs_large_no_knn),
    Claim("neighbours at inference lower FID (k as trained vs k=0)", "Fig. 9", "fid", -1, knn_at_inference),
    Claim("a larger index lowers FID", "Sec. 6.5", "fid", -1, index_fraction),
    Claim("the paper's conditioning (K+1 tokens) beats the other variants", "Sec. 6.5", "fid", -1, variants),
    Claim("stronger guidance raises text alignment", "Sec. 6.7 (lambda = 8)", "r_precision", +1, guidance),
    Claim("a swapped index moves the images to its style (FID to the test set rises)", "Sec. 4, Fig. 7", "fid", +1,
          swapped_index),
    Claim("the model matches the text better than the first retrieved image", "Fig. 2", "r_precision", +1,
          model_vs_retrieval),
]


class ScoreStore:
    """The per-image values of evaluate point runs, downloaded from MLflow once each."""

    def __init__(self, client):
        self.client = client
        self.folder = Path(tempfile.mkdtemp(prefix="knn-claims-"))
        self.cache: dict[str, object] = {}

    def _download(self, run_id: str, path: str) -> Path | None:
        if self.client is None or not run_id:
            return None
        try:
            return Path(self.client.download_artifacts(run_id, path, str(self.folder / run_id)))
        except Exception:  # logged before per-image values existed, or in another store
            return None

    def point(self, run_id: str) -> PointScores | None:
        if run_id not in self.cache:
            folder = self._download(run_id, "scores")
            self.cache[run_id] = PointScores.load(folder) if folder and (folder / "clip.npy").is_file() else None
        return self.cache[run_id]

    def reference(self, stage_run_id: str) -> Reference | None:
        key = f"reference:{stage_run_id}"
        if key not in self.cache:
            path = self._download(stage_run_id, "scores/reference.npy")
            self.cache[key] = Reference(np.load(path)) if path else None
        return self.cache[key]


def measure_pair(metric: str, sign: int, a: pd.Series, b: pd.Series, scores: ScoreStore, resamples: int,
                 set_resamples: int) -> dict:
    """``a - b`` in ``metric`` with its paired 95% CI and the verdict on the expected ``sign``."""
    row = {"difference": a[metric] - b[metric], "ci_low": np.nan, "ci_high": np.nan}
    if (a["prompts_sha256"], a["seeds"]) != (b["prompts_sha256"], b["seeds"]) or not a["prompts_sha256"]:
        return {**row, "verdict": f"{NOT_MEASURED}: other prompts or seeds"}
    point_a, point_b = scores.point(a["run_id"]), scores.point(b["run_id"])
    reference = scores.reference(a["parent_run_id"])
    if point_a is None or point_b is None or reference is None:
        return {**row, "verdict": f"{NOT_MEASURED}: no per-image values logged"}
    interval = paired_differences(point_a, point_b, reference, resamples=resamples, set_resamples=set_resamples,
                                  metrics=(metric,))[metric]
    return {"difference": interval.estimate, "ci_low": interval.low, "ci_high": interval.high,
            "verdict": verdict(interval, sign).value}


def claims_table(runs: pd.DataFrame, client, *, resamples: int = 1000, set_resamples: int = 200) -> pd.DataFrame:
    """One row per claim, backbone and compared pair; a claim with no pair in the runs gets one
    "not measured" row per backbone, so the table always lists every claim."""
    scores = ScoreStore(client)
    rows = []
    for claim in CLAIMS:
        for backbone, group in runs.groupby("backbone", sort=True):
            pairs = claim.pairs(group)
            base = {"claim": claim.name, "paper": claim.paper, "backbone": backbone, "metric": claim.metric,
                    "expected": "a > b" if claim.sign > 0 else "a < b"}
            if not pairs:
                rows.append({**base, "compared": "-", "a": np.nan, "b": np.nan, "difference": np.nan,
                             "ci_low": np.nan, "ci_high": np.nan, "verdict": f"{NOT_MEASURED}: not in these runs"})
            for label, a, b in pairs:
                rows.append({**base, "compared": label, "a": a[claim.metric], "b": b[claim.metric],
                             **measure_pair(claim.metric, claim.sign, a, b, scores, resamples, set_resamples),
                             "run_a": a["run_id"], "run_b": b["run_id"]})
    return pd.DataFrame(rows)


def claims_markdown(table: pd.DataFrame) -> str:
    """The claims table as markdown: difference a - b with its 95% CI and the verdict."""
    lines = ["| claim | paper | backbone | a vs b | metric | a | b | a - b [95% CI] | expected | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        ci = "" if pd.isna(row.ci_low) else f" [{row.ci_low:.4g}, {row.ci_high:.4g}]"
        diff = "-" if pd.isna(row.difference) else f"{row.difference:.4g}{ci}"
        values = ["-" if pd.isna(v) else f"{v:.4g}" for v in (row.a, row.b)]
        lines.append(f"| {row.claim} | {row.paper} | {row.backbone} | {row.compared} | {row.metric} | "
                     f"{values[0]} | {values[1]} | {diff} | {row.expected} | **{row.verdict}** |")
    return "\n".join(lines)

