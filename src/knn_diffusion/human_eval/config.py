"""Params sections of the human evaluation stages (``human_eval``, ``human_eval_aggregate`` and their
``_manipulation`` twins, which are the same sections with other defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between


class Question(str, Enum):
    quality = "quality"  # "Which image is of a higher quality?"
    alignment = "alignment"  # "Which image best matches the text?" (the prompt is shown)
    edit_alignment = "edit_alignment"  # "Which edit matches the text better?" (input | edit images)
    edit_identity = "edit_identity"  # "Which edit keeps the original object better?"


@dataclass
class HumanEvalConfig:
    """The ``human_eval`` stage: two generate-style folders (A = ours, B = the baseline) -> a study package."""

    system_a: str = "outputs/evaluate/continuous/k10-frac1-g8-openmoji"  # an evaluate@continuous grid point (kNN)
    system_b: str = "outputs/evaluate/continuous/retrieval_baseline"
    name_a: str = ""  # shown in the table and MLflow; empty: the folder's name
    name_b: str = ""
    n_pairs: int = field(default=600, metadata=between(1))  # the paper's 600; fewer when fewer prompts are shared
    seed: int = 0  # which pairs, their order, and which side A is shown on
    questions: list[Question] = field(default_factory=lambda: [Question.quality, Question.alignment])
    raters: int = field(default=5, metadata=between(1, 100))  # per pair and question (the paper: 5)
    base_url: str = ""  # where the package folder is uploaded; MTurk image URLs are base_url + images/...
    screenshot: bool = True  # a task screen rendered by headless chromium, to MLflow (skipped without chromium)


def manipulation_study() -> HumanEvalConfig:
    """The ``human_eval_manipulation`` section: edits vs the text-to-image baseline (evaluate_manipulation's
    folders of input | output images) with the paper's two manipulation questions."""
    return HumanEvalConfig(system_a="outputs/evaluate_manipulation/edit",
                           system_b="outputs/evaluate_manipulation/text_to_image",
                           questions=[Question.edit_alignment, Question.edit_identity])


@dataclass
class HumanEvalAggregateConfig:
    """The ``human_eval_aggregate`` stage: raters' CSV files -> the paper's table."""

    results_dir: str = "results/human_eval"  # MTurk batch results and/or task-page downloads (*.csv)
    strict: bool = True  # any problem stops; false: leave the offending rows out, report and count them


def manipulation_results() -> HumanEvalAggregateConfig:
    """The ``human_eval_aggregate_manipulation`` section: the raters' answers to the edit study."""
    return HumanEvalAggregateConfig(results_dir="results/human_eval_manipulation")
