"""System folders for the human-eval tests, written by the real ``generate`` (PNG + sidecar per prompt,
``grid.png``). The generator paints one flat colour per system, so a pixel tells A from B; the
retrieval is an exact search over a few unit vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knn_diffusion.generation import generate
from knn_diffusion.models.config import ConditioningConfig
from tests.test_continuous_training import D as DIM
from tests.test_continuous_training import WordEncoder

PROMPTS = ["an emoji of a red heart", "an emoji of a smiling cat face", "an emoji of a green apple",
           "an emoji of a yellow star", "an emoji of a blue car", "an emoji of a pizza"]
COLOURS = {"A": (220, 40, 40), "B": (40, 40, 220)}
SIDE = 16


@dataclass
class FlatColour:
    """A Generator (generation.Generator protocol): a square of one colour, a corner pixel from the seed."""

    colour: tuple[int, int, int]
    run_id: str = ""
    conditioning: ConditioningConfig = field(default_factory=lambda: ConditioningConfig(embed_dim=DIM, k=2))
    backbone: str = "flat-colour"
    settings: dict = field(default_factory=dict)

    def sample(self, cond, *, guidance, steps, seeds):
        images = np.full((len(cond), SIDE, SIDE, 3), 255, np.uint8)  # (B, H, W, 3)
        images[:, SIDE // 4: 3 * SIDE // 4, SIDE // 4: 3 * SIDE // 4] = self.colour
        images[:, 0, 0] = np.asarray(seeds, dtype=np.uint8)[:, None]
        return images


def exact_knn(queries, k):
    bank = np.eye(DIM, dtype=np.float32)
    scores = queries @ bank.T  # (N, DIM)
    ids = np.argsort(-scores, axis=1)[:, :k]
    return ids, np.take_along_axis(scores, ids, 1), bank[ids]


def write_system(folder: Path, prompts: list[str], colour: tuple[int, int, int], run_id: str = "") -> Path:
    generate(FlatColour(colour, run_id), out_dir=folder, knn=exact_knn, prompts=prompts, encoder=WordEncoder(),
             steps=1)
    return folder


def write_systems(root: Path, run_id_a: str = "") -> tuple[Path, Path]:
    """A with every prompt; B with them in another order plus one A lacks."""
    a = write_system(root / "A", PROMPTS, COLOURS["A"], run_id_a)
    b = write_system(root / "B", PROMPTS[::-1] + ["an emoji of a rocket"], COLOURS["B"], "run-b")
    return a, b


def system_of(image_path: Path) -> str:
    """Which system drew an image (by its flat colour)."""
    from PIL import Image

    centre = tuple(int(v) for v in np.asarray(Image.open(image_path).convert("RGB"))[SIDE // 2, SIDE // 2])
    return next(name for name, colour in COLOURS.items() if colour == centre)
