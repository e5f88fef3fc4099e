"""What a study package looks like, for the run's record: its pairs tiled (A left, B right) and one task
screen rendered by headless chromium as a rater sees it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from knn_diffusion.human_eval.package import Pair
from knn_diffusion.images import image_grid

log = logging.getLogger(__name__)
PREVIEW_PAIRS = 32


def preview(pairs: list[Pair], limit: int = PREVIEW_PAIRS, min_side: int = 64) -> np.ndarray:
    """Up to ``limit`` pairs as tiles (A left, B right), images scaled to one side length."""
    shown = pairs[:limit]
    opened = [[Image.open(p.a_image).convert("RGB"), Image.open(p.b_image).convert("RGB")] for p in shown]
    side = max(min_side, *(max(im.size) for pair in opened for im in pair))
    tiles = np.full((len(shown), side, 2 * side + 6, 3), 160, np.uint8)  # (P, S, 2S+gap, 3), grey gap
    for tile, (a, b) in zip(tiles, opened):
        tile[:, :side] = np.asarray(a.resize((side, side), Image.NEAREST))
        tile[:, side + 6:] = np.asarray(b.resize((side, side), Image.NEAREST))
    return image_grid(tiles, columns=4, pad=12)


def screenshot(page: Path, out: Path) -> bool:
    """Render one task screen with headless chromium (Debian's); False when there is none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        log.warning("no chromium on PATH: no task-screen screenshot (apt-get install chromium)")
        return False
    with tempfile.TemporaryDirectory() as profile:
        try:
            done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                   f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1100,720",
                                   "--virtual-time-budget=5000", f"{page.resolve().as_uri()}?rater=rater-01"],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            log.warning("chromium took over 120 s to render %s: no screenshot", page)
            return False
    if done.returncode != 0 or not out.is_file():
        log.warning("chromium could not render %s (exit %s): no screenshot", page, done.returncode)
        return False
    return True
