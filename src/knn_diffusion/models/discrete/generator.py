"""The discrete backbone as a generator: sampled token maps decoded by the VQ that made the training tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knn_diffusion.models.config import ConditioningConfig
from knn_diffusion.models.discrete.config import DISCRETE, DiscreteConfig
from knn_diffusion.models.discrete.diffusion import DiscreteDiffusion
from knn_diffusion.models.discrete.sampler import sample_tokens
from knn_diffusion.models.discrete.vq import Tokenizer
from knn_diffusion.training.checkpoint import load_weights

TOKENIZER_DIR = "tokenizer"  # inside a discrete checkpoint: the VQ that decodes its tokens


@dataclass
class DiscreteGenerator:
    """The transformer over VQ tokens with its tokenizer; implements generation's Generator protocol."""

    model: DiscreteDiffusion
    tokenizer: Tokenizer
    truncation: float = 1.0
    run_id: str = ""
    backbone: str = DISCRETE
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.settings = {"truncation": self.truncation, "sampler": "vq-diffusion"}

    @property
    def conditioning(self) -> ConditioningConfig:
        return self.model.config.conditioning

    def sample(self, cond: np.ndarray, *, guidance: float, steps: int, seeds: Sequence[int]) -> np.ndarray:
        """cond (B, 1+K, d) float32 -> uint8 images (B, H, W, 3)."""
        tokens = sample_tokens(self.model, cond, guidance=guidance, steps=steps, truncation=self.truncation,
                               seeds=seeds)
        t = self.model.config.transformer
        return self.tokenizer.decode(tokens.view(-1, t.height, t.width))


def load_discrete_generator(checkpoint_dir: Path, config: dict, *, truncation: float | None = None,
                            ema: bool = True) -> DiscreteGenerator:
    """A discrete checkpoint directory (weights + config.json + ``tokenizer/``) -> generator, eval mode.

    ``truncation`` defaults to the one the run's preview grids used (``train_discrete.sampling``).
    """
    model = DiscreteDiffusion(DiscreteConfig.from_dict(config["model"]))
    load_weights(checkpoint_dir, model, ema=ema)
    tokenizer = Tokenizer.load(Path(checkpoint_dir) / TOKENIZER_DIR)
    if tokenizer.num_codes != model.num_codes:
        raise ValueError(f"{checkpoint_dir}: tokenizer has {tokenizer.num_codes} codes, the model {model.num_codes}")
    if truncation is None:
        truncation = float(config.get("train", {}).get("sampling", {}).get("truncation", 1.0))
    return DiscreteGenerator(model.eval(), tokenizer, truncation, run_id=str(config.get("mlflow_run_id", "")))
