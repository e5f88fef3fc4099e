"""Aggregation of hand-made result files against a hand-made key: exact percentages, every problem found."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from knn_diffusion.human_eval.aggregate import ResultsError, aggregate, markdown_table
from knn_diffusion.human_eval.stats import fleiss_kappa, wilson_interval

QUALITY = "Which image is of a higher quality?"
RATERS = ["r1", "r2", "r3", "r4", "r5"]


def make_key(sides=("left", "right", "left", "right"), raters=5, questions=("quality", "alignment")):
    return {"package_id": "pkg0123456789abc", "raters": raters, "questions": list(questions),
            "system_a": {"name": "knn"}, "system_b": {"name": "retrieval_baseline"},
            "pairs": [{"pair_id": f"p{i + 1:04d}", "a_side": side} for i, side in enumerate(sides)]}


def page_file(path, rows, package="pkg0123456789abc"):
    """A task-page download: rows of (question, pair, rater, choice)."""
    lines = ["package_id,question,pair_id,rater_id,choice,answered_at"]
    lines += [f"{package},{q},{pair},{rater},{choice},2026-01-01T00:00:00Z" for q, pair, rater, choice in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def votes_for(key, question, pair_votes, raters=RATERS):
    """Rows where the first ``n_a`` raters of each pair pick system A's side and the rest pick B's."""
    a_side = {p["pair_id"]: p["a_side"] for p in key["pairs"]}
    other = {"left": "right", "right": "left"}
    rows = []
    for pair, n_a in pair_votes.items():
        for i, rater in enumerate(raters):
            rows.append((question, pair, rater, a_side[pair] if i < n_a else other[a_side[pair]]))
    return rows


def test_unanimous_raters(tmp_path):
    key = make_key()
    page_file(tmp_path / "a.csv", votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 5, "p0004": 0}))
    report = aggregate(tmp_path, key)
    q = report.results["quality"]
    assert (q.wins_a, q.wins_b, q.ties, q.pairs, q.answers, q.raters) == (3, 1, 0, 4, 20, 5)
    assert q.pct_prefer_a == 75.0
    assert (round(q.ci_low, 2), round(q.ci_high, 2)) == (30.06, 95.44)  # Wilson, 3 of 4
    assert q.kappa == pytest.approx(1.0)
    assert q.pct_left == 75.0  # p0001, p0003 (A on the left) and p0004 (B on the left)
    assert report.results["alignment"] is None and report.problems == []


def test_manipulation_questions_aggregate_by_id_or_text(tmp_path):
    key = make_key(questions=("edit_alignment", "edit_identity"))
    page_file(tmp_path / "a.csv", votes_for(key, "edit_alignment", {"p0001": 5, "p0002": 4, "p0003": 1, "p0004": 5})
              + [("Which edit keeps the original object better?", pair, rater, choice)
                 for _, pair, rater, choice in votes_for(key, "x", {"p0001": 0, "p0002": 0, "p0003": 5, "p0004": 2})])
    report = aggregate(tmp_path, key)
    assert report.results["edit_alignment"].pct_prefer_a == 75.0 and report.problems == []
    assert report.results["edit_identity"].pct_prefer_a == 25.0


def test_split_three_two(tmp_path):
    key = make_key()
    page_file(tmp_path / "a.csv", votes_for(key, "quality", {"p0001": 3, "p0002": 3, "p0003": 2, "p0004": 3})
              + votes_for(key, "alignment", {"p0001": 3, "p0002": 3, "p0003": 3, "p0004": 3}))
    report = aggregate(tmp_path, key)
    quality, alignment = report.results["quality"], report.results["alignment"]
    assert quality.pct_prefer_a == 75.0 and (quality.wins_a, quality.wins_b) == (3, 1)
    assert alignment.pct_prefer_a == 100.0
    assert (round(alignment.ci_low, 2), alignment.ci_high) == (51.01, 100.0)
    # every pair 3-2 toward A: per-pair agreement 0.4, chance 0.6^2 + 0.4^2 = 0.52 -> (0.4-0.52)/0.48
    assert alignment.kappa == pytest.approx(-0.25)


def test_missing_rater_is_reported_and_lenient_mode_counts_the_tie(tmp_path):
    key = make_key()
    rows = votes_for(key, "quality", {"p0001": 5, "p0003": 4, "p0004": 1})
    rows += votes_for(key, "quality", {"p0002": 2}, raters=RATERS[:4])  # r5 never answered p0002: 2-2
    page_file(tmp_path / "a.csv", rows)
    with pytest.raises(ResultsError, match=r"pair p0002 \(quality\): answered by 4 rater\(s\), expected 5"):
        aggregate(tmp_path, key)
    q = aggregate(tmp_path, key, strict=False).results["quality"]
    assert (q.wins_a, q.wins_b, q.ties) == (2, 1, 1)
    assert q.pct_prefer_a == pytest.approx(200 / 3)
    assert q.answers == 19


def test_duplicate_answer_names_both_lines_and_keeps_the_first(tmp_path):
    key = make_key()
    rows = votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 0, "p0004": 0})
    rows.insert(3, ("quality", "p0001", "r2", "right"))  # r2 again on p0001, now for B (p0001's A is left)
    path = page_file(tmp_path / "a.csv", rows)
    with pytest.raises(ResultsError, match=rf"{path}:5: rater 'r2' already answered pair p0001 \(quality\) at "
                                           rf"{path}:3"):
        aggregate(tmp_path, key)
    report = aggregate(tmp_path, key, strict=False)
    assert [p.kind for p in report.problems] == ["duplicate"]
    assert report.results["quality"].pct_prefer_a == 50.0
    assert report.results["quality"].answers == 20


def test_swapped_left_right_key_turns_the_same_answers_around(tmp_path):
    """Every rater picks the LEFT image: A wins exactly where the key put A on the left."""
    rows = [("quality", f"p{i:04d}", rater, "left") for i in range(1, 5) for rater in RATERS]
    page_file(tmp_path / "a.csv", rows)
    assert aggregate(tmp_path, make_key(("left", "left", "left", "right"))).results["quality"].pct_prefer_a == 75.0
    swapped = aggregate(tmp_path, make_key(("right", "right", "right", "left"))).results["quality"]
    assert swapped.pct_prefer_a == 25.0 and swapped.pct_left == 100.0


def test_mturk_batch_results_with_extra_columns_and_a_rejected_assignment(tmp_path):
    key = make_key(questions=("quality",))
    header = ("HITId,HITTypeId,AssignmentId,WorkerId,AssignmentStatus,WorkTimeInSeconds,Input.image_a_url,"
              "Input.image_b_url,Input.prompt,Input.pair_id,Input.question,Input.package_id,Answer.choice.label,"
              "Approve,Reject")
    lines = [header]
    a_side = {p["pair_id"]: p["a_side"] for p in key["pairs"]}
    for pair, n_a in {"p0001": 4, "p0002": 1, "p0003": 5, "p0004": 3}.items():
        for i, worker in enumerate(["W1", "W2", "W3", "W4", "W5"]):
            side = a_side[pair] if i < n_a else {"left": "right", "right": "left"}[a_side[pair]]
            lines.append(f"H{pair},T1,A{pair}{worker},{worker},Approved,12,https://x/{pair}-left.png,"
                         f'https://x/{pair}-right.png,"a cat, smiling",{pair},{QUALITY},pkg0123456789abc,'
                         f"{side.title()},,")
    lines.append(f"Hp0001,T1,Ax,W9,Rejected,3,u,v,w,p0001,{QUALITY},pkg0123456789abc,Left,,spam")
    (tmp_path / "Batch_123_batch_results.csv").write_text("\n".join(lines) + "\n")
    report = aggregate(tmp_path, key)
    q = report.results["quality"]
    assert q.pct_prefer_a == 75.0 and (q.wins_a, q.wins_b, q.answers, q.raters) == (3, 1, 20, 5)
    assert report.rejected == 1


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    key = make_key(questions=("quality",))
    path = page_file(tmp_path / "a.csv", votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 0, "p0004": 2}))
    lines = path.read_text().splitlines()
    lines[2] = "pkg0123456789abc,quality,p0001"  # truncated row (line 3)
    lines[7] = lines[7].replace(",left,", ",middle,").replace(",right,", ",middle,")  # line 8: not an answer
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError) as err:
        aggregate(tmp_path, key)
    message = str(err.value)
    assert f"{path}:3: 3 fields, the header has 6" in message
    assert f"{path}:8: answer 'middle': expected Left or Right" in message
    assert "pair p0001 (quality): answered by 4 rater(s)" in message
    report = aggregate(tmp_path, key, strict=False)
    assert sorted(p.kind for p in report.problems) == ["malformed", "malformed", "missing_raters", "missing_raters"]
    assert report.results["quality"].pct_prefer_a == 50.0 and report.results["quality"].answers == 18


def test_results_of_another_package_always_stop(tmp_path):
    key = make_key()
    page_file(tmp_path / "a.csv", votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 5, "p0004": 5}))
    page_file(tmp_path / "b.csv", [("quality", "p0001", "r6", "left")], package="ffff000011112222")
    with pytest.raises(ResultsError, match=r"b.csv:2: 1 row\(s\) from package 'ffff000011112222', but the key is "
                                           r"for package 'pkg0123456789abc'"):
        aggregate(tmp_path, key, strict=False)


def test_unknown_pair_and_wrong_question(tmp_path, caplog):
    key = make_key(questions=("quality",))
    rows = votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 5, "p0004": 0})
    rows += [("quality", "p0099", "r1", "left"), ("alignment", "p0001", "r1", "left")]
    path = page_file(tmp_path / "a.csv", rows)
    with pytest.raises(ResultsError) as err:
        aggregate(tmp_path, key)
    assert f"{path}:22: pair id 'p0099' is not in the package" in str(err.value)
    assert f"{path}:23: an answer to 'alignment', which this package does not ask" in str(err.value)
    with caplog.at_level(logging.WARNING):
        report = aggregate(tmp_path, key, strict=False)
    assert report.results["quality"].pct_prefer_a == 75.0
    assert "left out" in caplog.text and "p0099" in caplog.text


def test_files_that_are_not_results(tmp_path):
    (tmp_path / "notes.csv").write_text("name,score\nx,1\n")
    (tmp_path / "photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    with pytest.raises(ResultsError) as err:
        aggregate(tmp_path, make_key())
    assert "notes.csv:1: neither MTurk batch results" in str(err.value) and "missing column" in str(err.value)
    assert "photo.csv:1: not a readable CSV" in str(err.value)


def test_empty_folder_has_no_results(tmp_path):
    report = aggregate(tmp_path, make_key())
    assert report.files == [] and report.results == {"quality": None, "alignment": None}
    assert "no answers yet" in markdown_table(report, make_key())


def test_markdown_table_in_the_papers_layout(tmp_path):
    key = make_key()
    page_file(tmp_path / "a.csv", votes_for(key, "quality", {"p0001": 5, "p0002": 5, "p0003": 5, "p0004": 0})
              + votes_for(key, "alignment", {"p0001": 3, "p0002": 3, "p0003": 3, "p0004": 3}))
    table = markdown_table(aggregate(tmp_path, key), key)
    assert "| Ours vs. | Image quality | Text alignment |" in table
    assert "| retrieval_baseline | 75.0% [30.1, 95.4] | 100.0% [51.0, 100.0] |" in table
    assert "Wilson" in table and "| Text alignment | 4 | 4 | 0 | 0 | 20 | 5 | -0.250 |" in table


def test_fleiss_kappa_matches_the_published_worked_example():
    """Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210."""
    counts = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                       [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert round(fleiss_kappa(counts), 3) == 0.210
    assert np.isnan(fleiss_kappa(np.array([[5, 0], [5, 0]])))  # one category only: undefined


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(8, 10)
    z = 1.959963984540054
    centre, half = (0.8 + z * z / 20) / (1 + z * z / 10), z / (1 + z * z / 10) * np.sqrt(0.016 + z * z / 400)
    assert (low, high) == pytest.approx((centre - half, centre + half))
