"""The backbones by name: what a checkpoint's ``backbone`` field (and a stage's ``--model``) selects.

Each backbone is a package under ``models/`` (``continuous/``, ``discrete/``) holding its configs,
network, loss and training, sampler and generator; code that must work for any backbone (the
``sample``, ``evaluate`` and ``generate`` commands) reaches them only through this table, which sits
above them all (``generation.py``, the common path, sits below). A new backbone adds its package and
one entry here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from knn_diffusion.generation import Generator
from knn_diffusion.models.continuous.config import BACKBONE as CONTINUOUS
from knn_diffusion.models.continuous.generator import load_continuous_generator
from knn_diffusion.models.discrete.config import DISCRETE
from knn_diffusion.models.discrete.generator import load_discrete_generator
from knn_diffusion.training.checkpoint import read_checkpoint_config

# backbone name -> loader(checkpoint dir, its config.json, **sampler options)
GENERATOR_LOADERS: dict[str, Callable[..., Generator]] = {CONTINUOUS: load_continuous_generator,
                                                          DISCRETE: load_discrete_generator}


def load_generator(checkpoint_dir: str | os.PathLike, *, backbone: str | None = None, **options: Any) -> Generator:
    """The generator saved in ``checkpoint_dir``; checkpoints from before the ``backbone`` field are continuous.

    ``backbone``: the one the caller asked for (``--model``); a checkpoint of another is refused.
    ``options``: the backbone's sampler options (``ContinuousSampler.generator_options()``: ``scheduler``;
    ``DiscreteSampler``'s: ``truncation``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_checkpoint_config(checkpoint_dir)
    found = config.get("backbone", CONTINUOUS)
    if backbone is not None and found != backbone:
        raise ValueError(f"{checkpoint_dir}: a {found} checkpoint, but the {backbone} model was asked for")
    if found not in GENERATOR_LOADERS:
        raise ValueError(f"{checkpoint_dir}: backbone {found!r}: expected one of {sorted(GENERATOR_LOADERS)}")
    return GENERATOR_LOADERS[found](checkpoint_dir, config, **options)
