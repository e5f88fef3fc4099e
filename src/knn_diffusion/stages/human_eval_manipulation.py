"""DVC stage ``human_eval_manipulation``: the human study of edits, packaged like ``human_eval``'s.

Pairs ``human_eval_manipulation.system_a`` (default: ``evaluate_manipulation``'s edits) with ``system_b``
(default: its text-to-image baseline) by prompt; every image shows the input (left) and that system's
output (right); the questions are the paper's two for manipulation ("Which edit matches the text
better?", "Which edit keeps the original object better?"). Package, key, MTurk files and MLflow
artifacts are ``human_eval``'s (same code); outs under ``outputs/human_eval/manipulation/``.
"""

from __future__ import annotations

from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage
from knn_diffusion.stages.human_eval import StudyFiles, package_study

EDIT_STUDY = StudyFiles(paths.HUMAN_EVAL_MANIPULATION / "package", paths.HUMAN_EVAL_MANIPULATION_KEY,
                        paths.HUMAN_EVAL_MANIPULATION_METRICS)


def main(argv: list[str] | None = None) -> None:
    run_stage("human_eval_manipulation", lambda params: package_study(params, "human_eval_manipulation", EDIT_STUDY),
              argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    main()
