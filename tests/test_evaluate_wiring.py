"""Tests that fail when the evaluation is wired wrong (each found by breaking the code on purpose):

- prompts and FID/KID references come from the test split only, on the default path and the prompts-file path
  (and from the val split only when ``evaluate.split=val`` chooses settings);
- R-precision ranks each image's prompts (image -> texts), checked on a fixture where the two axes disagree.
(The points of one evaluate run sharing prompts and seeds: tests/test_evaluate_stage.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from knn_diffusion.config import build_params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.evaluation.metrics import r_precision
from knn_diffusion.stages import evaluate, paths


@pytest.fixture()
def openmoji(tiny_pipeline, monkeypatch) -> ImageStore:
    monkeypatch.chdir(tiny_pipeline)
    return ImageStore.open(paths.dataset_dir("openmoji"))


def _other_splits(store: ImageStore) -> set[int]:
    return set(store.rows("train")) | set(store.rows("val"))


def test_default_prompts_and_reference_are_the_test_split(openmoji):
    params = build_params(None, ["evaluate.count=6"])
    prompts, rows, paired = evaluate.held_out(params, openmoji)
    assert paired and len(rows) == len(prompts) == 6
    assert set(rows) <= set(openmoji.rows("test")) and not set(rows) & _other_splits(openmoji)
    captions = openmoji.read_captions()
    template = params.encoder.prompt_template
    assert prompts == [template.format(name=captions[r]) for r in rows]  # each prompt names its image
    test_names = set(captions.loc[openmoji.rows("test")].dropna())
    other_names = set(captions.loc[sorted(_other_splits(openmoji))].dropna()) - test_names
    named = {p.removeprefix(template.split("{name}")[0]) for p in prompts}
    assert not named & other_names


def test_prompts_file_reference_is_still_the_test_split(openmoji, tmp_path, monkeypatch):
    (paths.PROMPTS).mkdir(exist_ok=True)
    (paths.PROMPTS / "wiring.txt").write_text("an emoji of a cat\nan emoji of a dog\nan emoji of a tree\n")
    params = build_params(None, ["evaluate.prompts_file=prompts/wiring.txt", "evaluate.count=5"])
    prompts, rows, paired = evaluate.held_out(params, openmoji)
    assert prompts == ["an emoji of a cat", "an emoji of a dog", "an emoji of a tree"] and not paired
    assert len(rows) == min(5, len(openmoji.rows("test")))
    assert set(rows) <= set(openmoji.rows("test")) and not set(rows) & _other_splits(openmoji)


@pytest.mark.parametrize("prompts_file", ["", "prompts/wiring.txt"])
def test_split_val_draws_prompts_and_reference_from_val_only(openmoji, prompts_file):
    (paths.PROMPTS).mkdir(exist_ok=True)
    (paths.PROMPTS / "wiring.txt").write_text("an emoji of a cat\nan emoji of a dog\n")
    params = build_params(None, ["evaluate.split=val", "evaluate.count=0",
                                 *([f"evaluate.prompts_file={prompts_file}"] if prompts_file else [])])
    _, rows, _ = evaluate.held_out(params, openmoji)
    val = set(openmoji.rows("val"))
    assert rows.size and set(rows) <= val
    assert not set(rows) & (set(openmoji.rows("test")) | set(openmoji.rows("train")))
    if not prompts_file:
        assert len(rows) == openmoji.read_captions().loc[sorted(val)].dropna().str.strip().ne("").sum()


def test_r_precision_ranks_prompts_per_image_not_images_per_prompt():
    # Orthonormal prompts e_0..e_4. Image 0 is a "hub": mostly e_0, a little of every prompt. Image i > 0
    # is faintly its own prompt (0.2 e_i) and mostly an unused direction, so nothing else is closer to it.
    n = 5
    texts = np.eye(n, n + 1)
    images = np.zeros((n, n + 1))
    images[0, :n] = 0.3
    images[0, 0] = 1.0
    images[1:, n] = np.sqrt(1 - 0.2 ** 2)
    images[np.arange(1, n), np.arange(1, n)] = 0.2
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    # image -> texts: every image ranks its own prompt first -> 1.0
    assert r_precision(images, texts, candidates=n) == 1.0
    # texts -> images would give 1/n: for each prompt i > 0 the hub (0.3 / 1.17 = 0.26) beats its own image (0.2)
    assert r_precision(texts, images, candidates=n) == pytest.approx(1 / n)
