"""DVC stage ``human_eval``: two systems' images -> a rater-facing study package + the key, kept apart.

Outs: ``outputs/human_eval/package/`` (what raters open or what is uploaded for Mechanical Turk) and
``outputs/human_eval/key.json`` (which side is A). MLflow gets a zip of the package, a preview of the
pairs (A left, B right) and a screenshot of a task screen as a rater sees it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from knn_diffusion.config import Params
from knn_diffusion.human_eval.package import Pair, make_pairs, package_size, read_system, write_package
from knn_diffusion.images import image_grid
from knn_diffusion.io import atomic_dir, atomic_path, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

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


def package_study(params: Params) -> dict:
    cfg = params.human_eval
    questions = [q.value for q in cfg.questions]
    started = time.perf_counter()
    with tracked("human_eval", params, "human_eval") as run:
        # An evaluate point that the evaluate runs did not produce (a sweep trial of a no_knn model has only
        # k=0 points; a backbone left out of pipeline.backbones has none) means no package this time; any
        # other missing folder is a mistake and fails below.
        missing = [folder for folder in (cfg.system_a, cfg.system_b) if not Path(folder).is_dir()
                   and Path(folder).is_relative_to(paths.EVALUATE) and paths.EVALUATE.is_dir()]
        if missing:
            log.warning("no package this run: evaluate produced no %s (human_eval.system_a/system_b)", missing)
            with atomic_path(paths.HUMAN_EVAL_KEY) as key_tmp, atomic_dir(paths.HUMAN_EVAL_PACKAGE):
                key_tmp.write_text(json.dumps({"package_id": "", "missing": missing}) + "\n")
            report = {"pairs": 0, "package_bytes": 0, "seconds": round(time.perf_counter() - started, 3)}
            run.metrics(report)
            write_json(paths.HUMAN_EVAL_METRICS, report)
            return report
        a, b = read_system(cfg.system_a), read_system(cfg.system_b)
        name_a, name_b = cfg.name_a or a.folder.name, cfg.name_b or b.folder.name
        pairs = make_pairs(a, b, cfg.n_pairs, cfg.seed)
        if len(pairs) < cfg.n_pairs:
            log.info("%d prompts shared by %s and %s: %d pairs instead of n_pairs=%d", len(pairs), a.folder,
                     b.folder, len(pairs), cfg.n_pairs)
        if not cfg.base_url:
            log.info("human_eval.base_url is empty: MTurk image URLs are relative (images/...); set it to where "
                     "the package is uploaded")
        with atomic_path(paths.HUMAN_EVAL_KEY) as key_tmp, atomic_dir(paths.HUMAN_EVAL_PACKAGE) as package_tmp:
            key = write_package(pairs, package_tmp, key_tmp, a=a, b=b, name_a=name_a, name_b=name_b,
                                questions=questions, raters=cfg.raters, base_url=cfg.base_url, seed=cfg.seed)
        size = package_size(paths.HUMAN_EVAL_PACKAGE)
        report = {"pairs": len(pairs), "package_bytes": size, "seconds": round(time.perf_counter() - started, 3)}
        run.tags({"package_id": key["package_id"], "system_a": name_a, "system_b": name_b,
                  "system_a.run_id": a.model_run_id, "system_b.run_id": b.model_run_id})
        run.image(preview(pairs), "human_eval/preview_a_left_b_right.png")
        with tempfile.TemporaryDirectory() as tmp:
            archive = shutil.make_archive(str(Path(tmp) / f"human_eval_package_{key['package_id']}"), "zip",
                                          root_dir=paths.HUMAN_EVAL_PACKAGE)
            run.artifact(archive, "human_eval")
            shot = Path(tmp) / "task_screen.png"
            if cfg.screenshot and screenshot(paths.HUMAN_EVAL_PACKAGE / f"{questions[-1]}.html", shot):
                run.artifact(shot, "human_eval")
        run.metrics(report)
        write_json(paths.HUMAN_EVAL_METRICS, report)
        log.info("package %s: %d pairs of %s vs %s, %.1f kB in %s (key: %s)", key["package_id"], len(pairs), name_a,
                 name_b, size / 1024, paths.HUMAN_EVAL_PACKAGE, paths.HUMAN_EVAL_KEY)
    return report


def main(argv: list[str] | None = None) -> None:
    run_stage("human_eval", package_study, argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    main()
