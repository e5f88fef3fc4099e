"""Packaging: pairs by prompt, seeded balanced sides, key kept apart, MTurk files, reproducible bytes."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from knn_diffusion.human_eval.package import MTURK_COLUMNS, QUESTIONS, make_pairs, read_system, write_package
from tests.human_eval_helpers import PROMPTS, system_of, write_systems


def package(tmp_path, name="pkg", seed=0, n_pairs=600, questions=("quality", "alignment"), base_url=""):
    a, b = (read_system(p) for p in write_systems(tmp_path / "systems", run_id_a="run-a"))
    pairs = make_pairs(a, b, n_pairs, seed)
    key = write_package(pairs, tmp_path / name, tmp_path / f"{name}-key.json", a=a, b=b, name_a="ours-k10",
                        name_b="theirs-baseline", questions=list(questions), raters=5, base_url=base_url, seed=seed)
    return key, tmp_path / name


def test_pairs_by_prompt_with_seeded_balanced_sides(tmp_path):
    a, b = (read_system(p) for p in write_systems(tmp_path))
    pairs = make_pairs(a, b, 600, seed=0)
    assert sorted(p.prompt for p in pairs) == sorted(PROMPTS)  # B's extra prompt has no partner
    for pair in pairs:
        assert json.loads(pair.a_image.with_suffix(".json").read_text())["prompt"] == pair.prompt
        assert json.loads(pair.b_image.with_suffix(".json").read_text())["prompt"] == pair.prompt
    assert Counter(p.a_side for p in pairs) == {"left": 3, "right": 3}
    assert make_pairs(a, b, 600, seed=0) == pairs
    assert [p.a_side for p in make_pairs(a, b, 600, seed=1)] != [p.a_side for p in pairs]
    fewer = make_pairs(a, b, 4, seed=0)
    assert len(fewer) == 4 and len({p.prompt for p in fewer}) == 4


def test_package_shows_left_right_only_and_the_key_says_which_is_a(tmp_path):
    key, folder = package(tmp_path)
    assert key["system_a"] == {"name": "ours-k10", "folder": str(tmp_path / "systems" / "A"), "model_run_id": "run-a"}
    for pair in key["pairs"]:
        left, right = (folder / "images" / f"{pair['pair_id']}-{side}.png" for side in ("left", "right"))
        assert (system_of(left), system_of(right)) == (("A", "B") if pair["a_side"] == "left" else ("B", "A"))
    seen_by_raters = "".join(p.read_text() for p in folder.rglob("*") if p.suffix in {".html", ".csv", ".json", ".md"})
    for secret in ("a_side", "ours-k10", "theirs-baseline", "run-a", str(tmp_path / "systems")):
        assert secret not in seen_by_raters
    assert json.loads((folder / "package.json").read_text())["package_id"] == key["package_id"]


def test_mturk_batch_input_and_layout(tmp_path):
    key, folder = package(tmp_path, base_url="https://bucket.example/study")
    with open(folder / "mturk" / "alignment-input.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == MTURK_COLUMNS and len(rows) == 6
    first = rows[0]
    assert first["image_a_url"] == f"https://bucket.example/study/images/{first['pair_id']}-left.png"
    assert first["image_b_url"] == f"https://bucket.example/study/images/{first['pair_id']}-right.png"
    assert first["question"] == QUESTIONS["alignment"] and first["package_id"] == key["package_id"]
    assert first["prompt"] == key["pairs"][0]["prompt"]
    alignment = (folder / "mturk" / "alignment-layout.html").read_text()
    quality = (folder / "mturk" / "quality-layout.html").read_text()
    for layout in (alignment, quality):
        assert "<crowd-classifier" in layout and 'name="choice"' in layout
        assert "${image_a_url}" in layout and "${image_b_url}" in layout and "${question}" in layout
    assert "${prompt}" in alignment and "${prompt}" not in quality


def test_task_pages_are_self_contained(tmp_path):
    _, folder = package(tmp_path)
    for question in ("quality", "alignment"):
        page = (folder / f"{question}.html").read_text()
        assert "http://" not in page and "https://" not in page and "<link" not in page
        task = json.loads(page.split('<script id="task" type="application/json">')[1].split("</script>")[0])
        assert task["show_prompt"] == (question == "alignment") and len(task["pairs"]) == 6
        assert all((folder / p["left"]).is_file() and (folder / p["right"]).is_file() for p in task["pairs"])


def test_the_manipulation_questions_package_like_the_others(tmp_path):
    key, folder = package(tmp_path, questions=("edit_alignment", "edit_identity"))
    assert key["questions"] == ["edit_alignment", "edit_identity"]
    for question in key["questions"]:
        page = (folder / f"{question}.html").read_text()
        task = json.loads(page.split('<script id="task" type="application/json">')[1].split("</script>")[0])
        assert task["question_text"] == QUESTIONS[question] and task["show_prompt"] and len(task["pairs"]) == 6
        assert QUESTIONS[question] in (folder / "mturk" / f"{question}-input.csv").read_text()
    assert QUESTIONS["edit_identity"] == "Which edit keeps the original object better?"


def test_package_bytes_are_reproducible(tmp_path):
    key1, one = package(tmp_path, "one")
    key2, two = package(tmp_path, "two")
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert key1["package_id"] == key2["package_id"]
    other, _ = package(tmp_path, "three", seed=1)
    assert other["package_id"] != key1["package_id"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: not a folder of generated images"):
        read_system(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no JSON sidecar with a 'prompt'"):
        read_system(tmp_path / "empty")
    a, _ = write_systems(tmp_path / "s")
    from tests.human_eval_helpers import write_system

    other = read_system(write_system(tmp_path / "other", ["a rocket"], (0, 0, 0)))
    with pytest.raises(ValueError, match="no prompt in common"):
        make_pairs(read_system(a), other, 10, 0)
    with pytest.raises(ValueError, match=r"questions \['quality', 'quality'\]: expected a non-empty subset"):
        package(tmp_path / "q", questions=("quality", "quality"))
