"""Read raters' answers back: validate them against the key, un-swap, vote, and tabulate.

Two result formats are read from one folder of ``*.csv`` files, told apart by their header:

* Mechanical Turk batch results: ``WorkerId``, ``Input.pair_id``, ``Input.question``,
  ``Input.package_id`` and ``Answer.choice.label`` (or ``Answer.choice``); other columns are ignored;
  rejected assignments (``AssignmentStatus`` = Rejected) are skipped and counted.
* the task page's download: ``package_id``, ``question``, ``pair_id``, ``rater_id``, ``choice``.

Every problem is reported with its file and line. In strict mode any problem stops aggregation; otherwise
the offending rows are left out (a duplicate keeps its first answer), each one logged and counted. Results
from another package (their package id differs from the key's) always stop it: un-swapping them with this
key would silently turn answers around.

Per question, each pair's raters vote; the majority of a pair goes to A or B (an even split is a tie and
counts for neither). The headline is the share of decided pairs won by A, with a 95% Wilson score
interval, as in the paper's tables; Fleiss' kappa measures how much raters agree beyond chance.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knn_diffusion.human_eval.package import QUESTIONS, SIDES
from knn_diffusion.human_eval.stats import fleiss_kappa, wilson_interval

log = logging.getLogger(__name__)

PAGE_COLUMNS = {"package": "package_id", "question": "question", "pair": "pair_id", "rater": "rater_id",
                "choice": "choice"}
MTURK_COLUMNS = {"package": "Input.package_id", "question": "Input.question", "pair": "Input.pair_id",
                 "rater": "WorkerId"}
MTURK_ANSWERS = ("Answer.choice.label", "Answer.choice")
# The table heading of each question (human_eval.config.Question); a test checks none is missing.
HEADLINE = {"quality": "Image quality", "alignment": "Text alignment",
            "edit_alignment": "Edit matches the text", "edit_identity": "Keeps the object"}


class ResultsError(ValueError):
    """Results that cannot be aggregated; the message lists every problem with file and line."""


@dataclass(frozen=True)
class Answer:
    where: str  # file:line
    question: str
    pair_id: str
    rater: str
    choice: str  # "left" | "right", as the rater saw it


@dataclass(frozen=True)
class Problem:
    kind: str  # malformed | unknown_pair | wrong_question | duplicate | missing_raters | extra_raters | package
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class QuestionResult:
    question: str
    pairs: int  # pairs with at least one answer
    wins_a: int
    wins_b: int
    ties: int
    pct_prefer_a: float  # of decided pairs, in percent
    ci_low: float
    ci_high: float
    kappa: float  # NaN when undefined (every rating in one category)
    answers: int
    raters: int
    pct_left: float  # share of answers picking the left image: position bias shows here

    def metrics(self) -> dict[str, float]:
        values = {"pct_prefer_a": self.pct_prefer_a, "ci_low": self.ci_low, "ci_high": self.ci_high,
                  "pairs": self.pairs, "ties": self.ties, "answers": self.answers, "raters": self.raters,
                  "kappa": self.kappa, "pct_left": self.pct_left}
        return {f"{self.question}.{k}": float(v) for k, v in values.items() if not np.isnan(v)}


@dataclass
class Report:
    files: list[str]
    results: dict[str, QuestionResult | None]  # None: no answers to this question yet
    problems: list[Problem] = field(default_factory=list)
    rejected: int = 0

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {f"problems.{kind}": float(n) for kind, n in
                                 Counter(p.kind for p in self.problems).items()}
        for result in self.results.values():
            if result is not None:
                out.update(result.metrics())
        return out


def _question_id(value: str, key: dict) -> str | None:
    """A question given by id ('quality') or by its text (MTurk carries the text)."""
    value = value.strip()
    by_text = {text: qid for qid, text in QUESTIONS.items()}
    qid = value if value in QUESTIONS else by_text.get(value)
    return qid if qid in key["questions"] else None


def _columns(header: list[str]) -> dict[str, str]:
    """Which column holds what, by the file's format (ValueError when it is neither)."""
    names = set(header)
    if "WorkerId" in names or any(name.startswith("Input.") for name in names):
        answer = next((name for name in MTURK_ANSWERS if name in names), None)
        missing = sorted(set(MTURK_COLUMNS.values()) - names) + ([] if answer else [MTURK_ANSWERS[0]])
        if missing:
            raise ValueError(f"MTurk batch results without column(s) {missing}")
        return {**MTURK_COLUMNS, "choice": answer}
    missing = sorted(set(PAGE_COLUMNS.values()) - names)
    if missing:
        raise ValueError("neither MTurk batch results (WorkerId, Input.*, Answer.choice.label) nor a task-page "
                         f"download: missing column(s) {missing}")
    return dict(PAGE_COLUMNS)


def read_file(path: Path, key: dict) -> tuple[list[Answer], list[Problem], int]:
    """(answers, problems, rejected assignments) of one results CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                return _read_rows(reader, path, key)
            except (csv.Error, UnicodeDecodeError) as err:
                return [], [Problem("malformed", f"{path}:{reader.line_num + 1}", f"not a readable CSV ({err})")], 0
    except OSError as err:
        return [], [Problem("malformed", str(path), f"cannot be read ({err.strerror})")], 0


def _read_rows(reader, path: Path, key: dict) -> tuple[list[Answer], list[Problem], int]:
    """Rows -> answers; each bad row becomes a Problem at its line (rows of another package: one per file)."""
    answers, problems, rejected = [], [], 0
    mismatched: list[tuple[str, str]] = []  # (where, package id found)
    header = next(reader, None)
    if not header:
        return [], [Problem("malformed", f"{path}:1", "empty file, expected a CSV header")], 0
    try:
        columns = _columns(header)
    except ValueError as err:
        return [], [Problem("malformed", f"{path}:1", str(err))], 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(Problem("malformed", where, f"{len(row)} fields, the header has {len(header)}"))
            continue
        values = dict(zip(header, row))
        if values.get("AssignmentStatus", "").strip() == "Rejected":
            rejected += 1
            continue
        package = values[columns["package"]].strip()
        if package != key["package_id"]:
            mismatched.append((where, package))
            continue
        choice, rater, pair = (values[columns[c]].strip() for c in ("choice", "rater", "pair"))
        if choice.lower() not in SIDES:
            problems.append(Problem("malformed", where, f"answer {choice!r}: expected Left or Right"))
            continue
        if not rater or not pair:
            problems.append(Problem("malformed", where, "empty rater id or pair id"))
            continue
        question = _question_id(values[columns["question"]], key)
        if question is None:
            problems.append(Problem("wrong_question", where, f"an answer to {values[columns['question']]!r}, "
                                    f"which this package does not ask (it asks {key['questions']})"))
            continue
        answers.append(Answer(where, question, pair, rater, choice.lower()))
    if mismatched:
        where, package = mismatched[0]
        problems.append(Problem("package", where, f"{len(mismatched)} row(s) from package {package!r}, but the key "
                                f"is for package {key['package_id']!r} (results of another package or another "
                                "randomisation)"))
    return answers, problems, rejected


def validate(answers: list[Answer], key: dict, source: str) -> tuple[list[Answer], list[Problem]]:
    """Unknown pairs and duplicates are left out; then every answered question must have each pair
    answered by exactly the configured number of raters."""
    known = {pair["pair_id"] for pair in key["pairs"]}
    problems, kept, first = [], [], {}
    for answer in answers:
        if answer.pair_id not in known:
            problems.append(Problem("unknown_pair", answer.where, f"pair id {answer.pair_id!r} is not in the package"))
            continue
        seen = first.get((answer.question, answer.pair_id, answer.rater))
        if seen is not None:
            problems.append(Problem("duplicate", answer.where, f"rater {answer.rater!r} already answered pair "
                                    f"{answer.pair_id} ({answer.question}) at {seen.where}"))
            continue
        first[(answer.question, answer.pair_id, answer.rater)] = answer
        kept.append(answer)
    counts = Counter((a.question, a.pair_id) for a in kept)
    raters = key["raters"]
    for question in sorted({a.question for a in kept}):
        for pair in key["pairs"]:
            n = counts[(question, pair["pair_id"])]
            if n != raters:
                kind = "missing_raters" if n < raters else "extra_raters"
                problems.append(Problem(kind, source, f"pair {pair['pair_id']} ({question}): answered by {n} "
                                        f"rater(s), expected {raters}"))
    return kept, problems


def tally(answers: list[Answer], key: dict, question: str) -> QuestionResult | None:
    """Un-swap with the key, take each pair's majority, and summarise one question."""
    a_side = {pair["pair_id"]: pair["a_side"] for pair in key["pairs"]}
    votes: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # pair -> [votes for A, votes for B]
    mine = [a for a in answers if a.question == question]
    if not mine:
        return None
    for answer in mine:
        votes[answer.pair_id][0 if answer.choice == a_side[answer.pair_id] else 1] += 1
    counts = np.array(list(votes.values()))  # (pairs, 2)
    wins_a, wins_b = int((counts[:, 0] > counts[:, 1]).sum()), int((counts[:, 0] < counts[:, 1]).sum())
    decided = wins_a + wins_b
    low, high = wilson_interval(wins_a, decided)
    return QuestionResult(
        question=question, pairs=len(counts), wins_a=wins_a, wins_b=wins_b, ties=len(counts) - decided,
        pct_prefer_a=100.0 * wins_a / decided if decided else float("nan"), ci_low=100.0 * low,
        ci_high=100.0 * high, kappa=fleiss_kappa(counts), answers=len(mine),
        raters=len({a.rater for a in mine}), pct_left=100.0 * sum(a.choice == "left" for a in mine) / len(mine))


def aggregate(results_dir: str | os.PathLike, key: dict, *, strict: bool = True) -> Report:
    """Read every ``*.csv`` under ``results_dir``, validate, and tally each question of the package."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.rglob("*.csv")) if results_dir.is_dir() else []
    answers, problems, rejected = [], [], 0
    for path in files:
        found, trouble, skipped = read_file(path, key)
        answers += found
        problems += trouble
        rejected += skipped
    kept, invalid = validate(answers, key, str(results_dir))
    problems += invalid
    foreign = [p for p in problems if p.kind == "package"]
    if foreign or (strict and problems):
        shown = foreign or problems
        raise ResultsError(f"{len(shown)} problem(s) in the results under {results_dir}"
                           + ("" if foreign else " (strict mode; human_eval_aggregate.strict=false aggregates "
                              "without the offending rows)") + ":\n" + "\n".join(f"  {p}" for p in shown))
    for problem in problems:
        log.warning("left out: %s", problem)
    if rejected:
        log.info("%d rejected MTurk assignment(s) skipped", rejected)
    return Report([str(p) for p in files], {q: tally(kept, key, q) for q in key["questions"]}, problems, rejected)


def preference_cell(pct: float | None, low: float | None, high: float | None) -> str:
    """'62.5% [40.9, 80.0]'; 'no answers yet' without a result, 'all pairs tied' when nothing was decided."""
    if pct is None:
        return "no answers yet"
    if np.isnan(pct):
        return "all pairs tied"
    return f"{pct:.1f}% [{low:.1f}, {high:.1f}]"


def _cell(result: QuestionResult | None) -> str:
    return preference_cell(None, None, None) if result is None else preference_cell(
        result.pct_prefer_a, result.ci_low, result.ci_high)


def markdown_table(report: Report, key: dict) -> str:
    """The paper's layout (one row per baseline, a column per question) plus the counts behind it."""
    a, b = key["system_a"]["name"], key["system_b"]["name"]
    questions = key["questions"]
    lines = [f"Human evaluation (package {key['package_id']}): percentage of pairs in which the majority of "
             f"raters preferred **{a}** over the baseline; brackets: 95% Wilson score interval.", "",
             "| Ours vs. | " + " | ".join(HEADLINE[q] for q in questions) + " |",
             "|---|" + "---|" * len(questions),
             f"| {b} | " + " | ".join(_cell(report.results[q]) for q in questions) + " |"]
    answered = [(q, r) for q, r in report.results.items() if r is not None]
    if answered:
        lines += ["", "| question | pairs | A wins | B wins | ties | answers | raters | Fleiss' kappa | left chosen |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for q, r in answered:
        kappa = "undefined" if np.isnan(r.kappa) else f"{r.kappa:.3f}"
        lines.append(f"| {HEADLINE[q]} | {r.pairs} | {r.wins_a} | {r.wins_b} | {r.ties} | {r.answers} | "
                     f"{r.raters} | {kappa} | {r.pct_left:.1f}% |")
    if report.problems:
        lines += ["", f"{len(report.problems)} problem(s) left out (non-strict mode):", ""]
        lines += [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"
