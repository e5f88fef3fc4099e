"""The manipulation stages on the session's tiny pipeline: pairs -> fine-tuning -> evaluation -> the edit
study package, and a successful ``knn-diffusion edit`` of an image of another size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from knn_diffusion.cli import main as cli_main
from knn_diffusion.stages import (
    evaluate_manipulation,
    human_eval_manipulation,
    manipulation_pairs,
    paths,
    train_manipulation,
)
from tests.conftest import copy_outputs

pytestmark = pytest.mark.slow  # trains on the tiny pipeline's outputs: tens of seconds


@pytest.fixture(scope="module")
def edited(tiny_pipeline, tmp_path_factory):
    root = copy_outputs(tiny_pipeline, tmp_path_factory.mktemp("manipulation"), "data", "models")
    shutil.copytree(Path(__file__).resolve().parents[1] / "prompts", root / "prompts")  # the held-out edit prompts
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update({"manipulation_pairs": {"min_correlation": -1.0, "k": 3},
                   "train_manipulation": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2,
                                          "log_every": 1, "sampling": {"steps": 2}},
                   "edit": {"steps": 2}, "evaluate_manipulation": {"images": 2, "grid_rows": 2},
                   "human_eval_manipulation": {"screenshot": False},
                   "evaluate": {"judge": "retrieval_encoder"}})  # the tiny pipeline trains no judge
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (manipulation_pairs, train_manipulation, evaluate_manipulation, human_eval_manipulation):
            stage.main([])
    return root


def test_pairs_come_from_the_train_split_and_keep_the_image_outside_the_box(edited):
    pairs = np.load(edited / paths.manipulation_pairs_file("openmoji"))
    report = json.loads((edited / paths.MANIPULATION_PAIRS_METRICS).read_text())
    assert report["pairs"] + report["skipped"] == report["images"] and report["pairs"] == len(pairs["rows"]) > 0
    assert 0 < report["ecc_convergence_rate"] <= 1
    table = np.load(edited / paths.neighbours_file("openmoji"))
    assert set(pairs["rows"].tolist()) <= set(table["rows"].tolist())
    assert (pairs["region_neighbours"] != pairs["rows"][:, None]).all()  # I itself is never its region's neighbour
    from knn_diffusion.data.store import ImageStore

    images = ImageStore.open(edited / paths.dataset_dir("openmoji"))
    for row, box, manipulated in zip(pairs["rows"][:5], pairs["boxes"][:5], pairs["manipulated"][:5]):
        outside = np.ones(manipulated.shape[:2], bool)
        outside[box[0]:box[2], box[1]:box[3]] = False
        assert np.array_equal(manipulated[outside], images[int(row)][outside])


def test_fine_tuned_model_evaluation_and_study(edited):
    trained = json.loads((edited / paths.MANIPULATION_METRICS).read_text())
    assert trained["steps"] == 4 and np.isfinite(trained["last_loss"])
    report = json.loads((edited / paths.EVALUATE_MANIPULATION_METRICS).read_text())
    assert set(report) == {"edit", "text_to_image", "input", "edit_minus_text_to_image", "edit_minus_input"}
    assert report["edit"]["clip_gain_ci_low"] <= report["edit"]["clip_gain"] <= report["edit"]["clip_gain_ci_high"]
    assert report["input"]["clip_gain"] == 0 and report["input"]["changed_fraction"] == 0
    assert report["input"]["ssim_outside"] == pytest.approx(1.0)
    assert (edited / paths.EVALUATE_MANIPULATION / "grid.png").is_file()
    key = json.loads((edited / paths.HUMAN_EVAL_MANIPULATION / "key.json").read_text())
    assert key["questions"] == ["edit_alignment", "edit_identity"] and key["pairs"]


def test_edit_cli_returns_the_inputs_size_with_a_sidecar(edited, monkeypatch, capsys):
    monkeypatch.chdir(edited)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3)).astype(np.uint8)).save("in.png")
    cli_main(["edit", "in.png", "a red heart", "sunglasses", "--out", "edits", "--steps", "2", "--seed", "5"])
    outputs = sorted((edited / "edits").glob("0*.png"))
    assert len(outputs) == 2 and all(Image.open(p).size == (70, 50) for p in outputs)
    record = json.loads(outputs[1].with_suffix(".json").read_text())
    assert record["prompt"] == "sunglasses" and record["seed"] == 6 and record["steps"] == 2
    assert record["model_run_id"] and record["model_sha256"] and record["encoder_fingerprint"]
    assert record["index_fingerprint"] and len(record["neighbour_ids"]) == record["k"] > 0
    assert Image.open(edited / "edits" / "grid.png").size[0] > 3 * 70
    assert "error" not in capsys.readouterr().err
