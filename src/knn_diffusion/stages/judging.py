"""Which encoder scores generated images in ``evaluate`` and ``evaluate_manipulation`` (``evaluate.judge``)."""

from __future__ import annotations

import logging

from knn_diffusion.encoders.encoder import Encoder
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.evaluation.config import JudgeChoice
from knn_diffusion.stages import paths

log = logging.getLogger(__name__)


def load_judge(params) -> Encoder:
    """The judge stage's model (default), or the retrieval encoder when ``evaluate.judge`` asks for it."""
    if params.evaluate.judge == JudgeChoice.retrieval_encoder:
        log.warning("evaluate.judge=retrieval_encoder: the encoder that retrieved the neighbours also scores "
                    "(circular: the retrieval baseline's R-precision is high by construction)")
        return load_encoder(params.encoder, paths.ENCODER)
    return load_encoder(params.judge, paths.JUDGE)


def judge_name(judge: Encoder) -> str:
    """What every report row names: which judge (kind) and its weights (fingerprint)."""
    return f"{judge.description.get('kind', 'encoder')}:{judge.fingerprint[:16]}"
