"""The study: its presets expand to valid, uniquely named trials covering the paper's ablations; a cut-down
study runs through DVC's queue, resumes only what is missing, and docs/study.md is generated from its runs."""

from __future__ import annotations

import subprocess

import mlflow
import pandas as pd
import pytest
import yaml

from flows.sweep_plan import merge_overrides, trials_of
from flows.sweep_presets import PRESETS, SweepPreset
from tests.conftest import REPO
from tests.test_pipeline_flow import harness  # noqa: F401 (fixture)


@pytest.mark.parametrize("name", ["study", "study-gpu"])
def test_presets_expand_to_valid_uniquely_named_trials(name):
    preset = PRESETS[name]
    combos, params = trials_of(preset.axes(), REPO, name, preset.base)  # validates every trial's params
    assert len(combos) == 10
    settings = [(p.train_continuous.variant.value, p.train_discrete.variant.value, p.train_continuous.preset,
                 tuple(p.evaluate.grid.k), tuple(p.evaluate.grid.index_fraction), tuple(p.evaluate.grid.index),
                 tuple(p.evaluate.discrete.guidance)) for p in params.values()]
    assert {s[0] for s in settings} == {"tokens", "no_knn"} and {s[2] for s in settings} == {
        "tiny", "small" if name == "study-gpu" else "micro"}
    assert {s[1] for s in settings} == {"tokens", "no_knn", "self_attention", "cross_attention_pooled",
                                        "concat_linear"}
    assert (0, 1, 5, 10, 20) in {s[3] for s in settings}
    assert (0.1, 0.3, 0.5, 0.7, 1.0) in {s[4] for s in settings} and ("openmoji", "noto") in {s[5] for s in settings}
    assert (1.0, 3.0, 8.0) in {s[6] for s in settings}
    for p in params.values():  # the whole test split, the same seeds, in every trial
        assert p.evaluate.count == 0 and p.evaluate.seeds == (5 if name == "study-gpu" else 1)
    assert all(p.data.resolution == (64 if name == "study-gpu" else 32) for p in params.values())


def test_the_defaults_preset_measures_the_papers_settings_on_val_only():
    preset = PRESETS["defaults"]
    _, params = trials_of(preset.axes(), REPO, "defaults", preset.base)
    assert all(p.evaluate.split.value == "val" and p.evaluate.count == 0 for p in params.values())
    trained = {(p.train_discrete.aux_weight, p.train_discrete.timestep_sampling.value) for p in params.values()}
    assert trained == {(1.0, "uniform"), (0.0005, "uniform"), (1.0, "importance")}
    assert all(tuple(p.evaluate.continuous.guidance) == (3.0, 8.0) for p in params.values())


def test_a_trials_own_value_wins_over_the_base():
    assert merge_overrides(["a=1", "b=2"], ["b=3", "c=4"]) == ["a=1", "b=3", "c=4"]
    assert SweepPreset(("a=1",), (("b=1,2",), ("c=3",))).axes() == ["b=1,2", "+", "c=3"]


def _trial_runs(prefix: str) -> dict:
    (parent,) = mlflow.search_runs(experiment_names=["study-test"], output_format="list",
                                   filter_string=f"tags.kind = 'sweep' and tags.`sweep.prefix` = '{prefix}'")
    trials = mlflow.search_runs(experiment_names=["study-test"], output_format="list",
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {t.info.run_name: t for t in trials}


@pytest.mark.slow  # a tiny pipeline reproduced, two trials through DVC's queue, a resume, the doc (~4 min)
def test_cut_down_study_runs_resumes_and_writes_its_doc(harness, tmp_path):  # noqa: F811
    from flows.study_doc import main as study_doc
    from flows.sweep import sweep
    from tests import dvc_repo

    stages = ("ingest", "encoder", "judge", "embed", "index", "knn", "train_continuous", "tokenizer",
              "train_discrete", "evaluate")
    params = dvc_repo.tiny_params(dvc_repo.tiny_open_clip(tmp_path), "study-test")
    repo = dvc_repo.make_repo(tmp_path / "repo", params, stages)
    dvc_repo.dvc(repo, "repro")
    dvc_repo.commit(repo, "baseline")
    mini = SweepPreset(("evaluate.count=0", "evaluate.seeds=2", "evaluate.retrieval_baseline=false"),
                       (("evaluate.grid.k=[0,1,3]",),
                        ("train_continuous.variant=no_knn", "train_discrete.variant=no_knn")),
                       ("evaluate@continuous", "evaluate@discrete"))
    run = dict(axes=mini.axes(), repo=str(repo), prefix="mini", base=list(mini.base), targets=list(mini.targets))
    names = sweep(**run)
    assert names == ["mini-k-0,1,3", "mini-variant-no_knn-variant-no_knn"]
    first = _trial_runs("mini")
    assert all(t.info.status == "FINISHED" for t in first.values())

    # A study killed before its second trial: that experiment is gone; the rerun runs it and nothing else.
    subprocess.run([dvc_repo.DVC, "exp", "remove", names[1]], cwd=repo, env=dvc_repo.env(repo), check=True)
    assert sweep(**run) == names
    again = _trial_runs("mini")
    assert again[names[0]].info.end_time == first[names[0]].info.end_time  # done: not reopened
    assert again[names[1]].info.end_time > first[names[1]].info.end_time  # missing: ran again

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", dvc_repo.env(repo)["PATH"])
        study_doc(["--prefix", "mini", "--repo", str(repo)])
    doc = (repo / "docs" / "study.md").read_text()
    assert doc.startswith("# Reproduction study: sweep 'mini'") and "## Claims of the paper" in doc
    assert "tokens vs no_knn, tiny" in doc and "k=3 vs k=0" in doc
    assert "![](study/fid_vs_k.png)" in doc and (repo / "docs" / "study" / "fid_vs_k.png").is_file()
    assert "## Sample grids" in doc and len(list((repo / "docs" / "study" / "grids").glob("*.png"))) >= 2
    assert "package `outputs/study/human_eval/continuous/package`" in doc  # repo-relative: the doc is committed
    packages = repo / "outputs" / "study" / "human_eval" / "continuous"
    key = yaml.safe_load((packages / "key.json").read_text())
    images = len(list((packages / "a-tokens").glob("0*.png")))
    test_rows = (pd.read_parquet(repo / "data" / "ingest" / "openmoji" / "manifest.parquet")["split"] == "test").sum()
    assert len(key["pairs"]) == images == 2 * test_rows > 0  # every test prompt x 2 seeds
    assert key["system_b"]["name"] == "no kNN"
