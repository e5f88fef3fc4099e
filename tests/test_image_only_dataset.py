"""The paper's setting: a generator dataset of images without any caption, through every stage to ``sample``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from knn_diffusion.encoders.store import load_text_embeddings
from knn_diffusion.stages import embed, encoder, index, ingest, knn, paths, sample, train_continuous
from tests.dvc_repo import tiny_open_clip, tiny_params
from tests.glyphs import OPENMOJI_FONT, named_emoji, render


def test_caption_free_folder_dataset_runs_to_sample(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "my_images"  # emoji rendered to PNG files with no sibling caption files
    folder.mkdir()
    images, _ = render(OPENMOJI_FONT, [ch for ch, _ in named_emoji(60)])
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    params = tiny_params(tiny_open_clip(tmp_path), "image-only")
    params["data"]["datasets"] = {"mine": {"source": "folder", "path": str(folder)}}
    params["data"]["generator_dataset"] = "mine"
    params["sample"].update({"indexes": ["mine"], "prompts_file": "prompts/mine.txt"})
    work = tmp_path / "work"
    (work / "prompts").mkdir(parents=True)
    (work / "prompts" / "mine.txt").write_text("a red heart\n\na smiling cat\n")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)
    caplog.set_level("INFO")
    for stage in (ingest, encoder, embed, index, knn, train_continuous, sample):
        stage.main([])

    assert json.loads(paths.INGEST_METRICS.read_text())["datasets"]["mine"]["named_fraction"] == 0
    report = json.loads(paths.ENCODER_METRICS.read_text())
    assert not any(key.startswith("recall@") for key in report) and report["eval_images"] > 0
    assert "recall not measured: the test split of 'mine' has no captions" in caplog.text
    assert load_text_embeddings(paths.EVAL_PROMPTS)[1] == []
    records = [json.loads(p.read_text()) for p in sorted((paths.samples_dir("continuous") / "mine").glob("0*.json"))]
    assert [r["prompt"] for r in records] == ["a red heart", "a smiling cat"]  # from the prompts file
    assert all(len(r["neighbour_ids"]) == 3 for r in records)
    assert np.asarray(Image.open(paths.samples_dir("continuous") / "mine" / "grid.png")).ndim == 3


def test_prompts_file_outside_the_declared_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere.txt").write_text("a cat\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sample": {"prompts_file": "elsewhere.txt"}}))
    with pytest.raises(SystemExit) as exit_info:
        sample.main([])
    assert exit_info.value.code == 2
    assert "expected a file under prompts/" in capsys.readouterr().err
