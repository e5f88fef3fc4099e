"""Generate-style system folders for the human-eval tests: ``<i>-<slug>.png`` + JSON sidecar, as ``generate``
writes them (PNG through the project's writer; one flat colour per system so a pixel tells A from B)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from knn_diffusion.images import save_png
from knn_diffusion.io import write_json

PROMPTS = ["an emoji of a red heart", "an emoji of a smiling cat face", "an emoji of a green apple",
           "an emoji of a yellow star", "an emoji of a blue car", "an emoji of a pizza"]
COLOURS = {"A": (220, 40, 40), "B": (40, 40, 220)}


def write_system(folder: Path, prompts: list[str], colour: tuple[int, int, int], run_id: str = "",
                 side: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        stem = f"{i:04d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:40]}"
        image = np.full((side, side, 3), 255, np.uint8)
        image[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = colour
        image[0, 0] = (i, i, i)  # every image distinct
        save_png(folder / f"{stem}.png", image)
        write_json(folder / f"{stem}.json", {"prompt": prompt, "seed": i, "k": 3, "model_run_id": run_id,
                                             "image": f"{stem}.png"})
    save_png(folder / "grid.png", np.zeros((4, 4, 3), np.uint8))
    return folder


def write_systems(root: Path, run_id_a: str = "") -> tuple[Path, Path]:
    """A with every prompt; B with them in another order plus one A lacks."""
    a = write_system(root / "A", PROMPTS, COLOURS["A"], run_id_a)
    b = write_system(root / "B", PROMPTS[::-1] + ["an emoji of a rocket"], COLOURS["B"], "run-b")
    return a, b


def system_of(image_path: Path) -> str:
    """Which system drew an image (by its flat colour)."""
    from PIL import Image

    centre = tuple(int(v) for v in np.asarray(Image.open(image_path).convert("RGB"))[8, 8])
    return next(name for name, colour in COLOURS.items() if colour == centre)
