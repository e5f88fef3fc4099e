"""DVC stage ``judge``: the encoder that scores generated images in ``evaluate`` (CLIP score, R-precision,
FID/KID features without Inception weights), independent of the retrieval encoder.

``judge.kind: aligned`` trains it like the ``encoder`` stage (same code) on emoji styles the retrieval
encoder never sees (``judge.alignment.datasets``; config.py refuses an overlap), with its own seed and
image-tower shape; before training, the image contents of its pairs, the retrieval encoder's pairs and
the generator's test split are checked to be pairwise disjoint. ``judge.kind: open_clip`` records a
pretrained CLIP instead. When aligned, it shares with the retriever the frozen MiniLM text tower and, with
params.yaml's EfficientNet-Lite towers of two depths, an ImageNet start (see README, "The judge").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from knn_diffusion.config import Params
from knn_diffusion.data.independence import check_disjoint
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage
from knn_diffusion.stages.encoder import PAIRS, encoder_stage


def check_independent(pairs: pd.DataFrame, test_hashes: np.ndarray) -> None:
    """The judge's pairs, the retrieval encoder's pairs (when it was aligned) and the test split share no image."""
    sets = {"judge pairs": pairs["content_hash"], "test split": test_hashes}
    try:
        sets["retrieval encoder pairs"] = pd.read_parquet(paths.ENCODER / PAIRS)["content_hash"]
    except FileNotFoundError:  # a pretrained retrieval encoder has no pairs here
        pass
    check_disjoint(sets)


def judge_stage(params: Params) -> None:
    encoder_stage(params, "judge", paths.JUDGE, paths.JUDGE_METRICS, paths.JUDGE_STATE,
                  check_pairs=check_independent)


def main(argv: list[str] | None = None) -> None:
    run_stage("judge", judge_stage, argv)


if __name__ == "__main__":
    main()
