"""DVC stage ``human_eval_aggregate_manipulation``: the raters' answers to the edit study -> its table.

``human_eval_aggregate``'s code over ``human_eval_manipulation``'s key and the answers in
``human_eval_aggregate_manipulation.results_dir``; writes ``outputs/human_eval/manipulation/results.md`` and
``metrics/human_eval_aggregate_manipulation.json``. With no answers yet it says so and succeeds.
"""

from __future__ import annotations

from knn_diffusion.human_eval.aggregate import ResultsError
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage
from knn_diffusion.stages.human_eval_aggregate import ResultFiles, aggregate_study

EDIT_RESULTS = ResultFiles(paths.HUMAN_EVAL_MANIPULATION_KEY, paths.HUMAN_EVAL_MANIPULATION_TABLE,
                           paths.HUMAN_EVAL_AGGREGATE_MANIPULATION_METRICS)


def main(argv: list[str] | None = None) -> None:
    run_stage("human_eval_aggregate_manipulation",
              lambda params: aggregate_study(params, "human_eval_aggregate_manipulation", EDIT_RESULTS),
              argv, user_errors=(FileNotFoundError, ResultsError))


if __name__ == "__main__":
    main()
