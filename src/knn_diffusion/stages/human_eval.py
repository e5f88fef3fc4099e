"""DVC stage ``human_eval``: two systems' images -> a rater-facing study package + the key, kept apart.

Outs: ``outputs/human_eval/package/`` (what raters open or what is uploaded for Mechanical Turk) and
``outputs/human_eval/key.json`` (which side is A). MLflow gets a zip of the package, a preview of the
pairs (A left, B right) and a screenshot of a task screen as a rater sees it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from knn_diffusion.config import Params
from knn_diffusion.human_eval.package import make_pairs, package_size, read_system, write_package
from knn_diffusion.human_eval.preview import preview, screenshot
from knn_diffusion.io import atomic_dir, atomic_path, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyFiles:
    package: Path  # what raters open / what is uploaded
    key: Path      # which side is A: never inside the package
    metrics: Path


GENERATION_STUDY = StudyFiles(paths.HUMAN_EVAL_PACKAGE, paths.HUMAN_EVAL_KEY, paths.HUMAN_EVAL_METRICS)


def package_study(params: Params, stage: str = "human_eval", files: StudyFiles = GENERATION_STUDY) -> dict:
    """Package the study of params section ``stage`` (``human_eval``, ``human_eval_manipulation``) into ``files``."""
    cfg = getattr(params, stage)
    questions = [q.value for q in cfg.questions]
    started = time.perf_counter()
    with tracked(stage, params, stage) as run:
        # An evaluate point that the evaluate runs did not produce (a sweep trial of a no_knn model has only
        # k=0 points; a backbone left out of pipeline.backbones has none) means no package this time; any
        # other missing folder is a mistake and fails below.
        missing = [folder for folder in (cfg.system_a, cfg.system_b) if not Path(folder).is_dir()
                   and Path(folder).is_relative_to(paths.EVALUATE) and paths.EVALUATE.is_dir()]
        if missing:
            log.warning("no package this run: evaluate produced no %s (human_eval.system_a/system_b)", missing)
            with atomic_path(files.key) as key_tmp, atomic_dir(files.package):
                key_tmp.write_text(json.dumps({"package_id": "", "missing": missing}) + "\n")
            report = {"pairs": 0, "package_bytes": 0, "seconds": round(time.perf_counter() - started, 3)}
            run.metrics(report)
            write_json(files.metrics, report)
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
        with atomic_path(files.key) as key_tmp, atomic_dir(files.package) as package_tmp:
            key = write_package(pairs, package_tmp, key_tmp, a=a, b=b, name_a=name_a, name_b=name_b,
                                questions=questions, raters=cfg.raters, base_url=cfg.base_url, seed=cfg.seed)
        size = package_size(files.package)
        report = {"pairs": len(pairs), "package_bytes": size, "seconds": round(time.perf_counter() - started, 3)}
        run.tags({"package_id": key["package_id"], "system_a": name_a, "system_b": name_b,
                  "system_a.run_id": a.model_run_id, "system_b.run_id": b.model_run_id})
        run.image(preview(pairs), "human_eval/preview_a_left_b_right.png")
        with tempfile.TemporaryDirectory() as tmp:
            archive = shutil.make_archive(str(Path(tmp) / f"human_eval_package_{key['package_id']}"), "zip",
                                          root_dir=files.package)
            run.artifact(archive, "human_eval")
            shot = Path(tmp) / "task_screen.png"
            if cfg.screenshot and screenshot(files.package / f"{questions[-1]}.html", shot):
                run.artifact(shot, "human_eval")
        run.metrics(report)
        write_json(files.metrics, report)
        log.info("package %s: %d pairs of %s vs %s, %.1f kB in %s (key: %s)", key["package_id"], len(pairs), name_a,
                 name_b, size / 1024, files.package, files.key)
    return report


def main(argv: list[str] | None = None) -> None:
    run_stage("human_eval", package_study, argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    main()
