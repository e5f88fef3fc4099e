"""The tokenizer and train_discrete stages on the tiny pipeline's real glyphs, the discrete generator
that load_generator returns for their model, and sample/evaluate with ``--model discrete``."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import yaml

from knn_diffusion.backbones import load_generator
from knn_diffusion.data.store import ImageStore
from knn_diffusion.stages import evaluate, paths, sample, tokenizer, train_discrete
from knn_diffusion.tracking import model_run_id
from knn_diffusion.training.checkpoint import read_checkpoint_config
from tests.conftest import copy_outputs

MICRO = {"n_layer": 1, "n_embd": 32, "n_head": 2, "mlp_ratio": 2}


def _trained_by() -> str:
    return model_run_id(paths.DISCRETE_MODEL, "tiny-pipeline")


def _folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def discrete_dir(tiny_pipeline, tmp_path_factory):
    """tokenizer + train_discrete run once on copies of the declared inputs (ingest, embed, knn), with the
    encoder and index that sample and evaluate retrieve with."""
    root = copy_outputs(tiny_pipeline, tmp_path_factory.mktemp("discrete") / "repo",
                        str(paths.INGEST), str(paths.EMBED), str(paths.KNN), str(paths.ENCODER), str(paths.INDEX))
    preset = root.parent / "transformer-micro.json"
    preset.write_text(json.dumps(MICRO))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"] = {"vq": {"block_out_channels": [8, 16, 16], "codebook_size": 64, "embed_dim": 4},
                           "steps": 4, "batch_size": 8, "log_every": 2}
    params["train_discrete"] = {"preset": str(preset), "k": 3, "batch_size": 4, "max_steps": 3, "warmup_steps": 1,
                                "checkpoint_every": 2, "log_every": 1, "transition": {"steps": 10},
                                "sampling": {"steps": 3}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        tokenizer.main([])
        train_discrete.main([])
        yield root


def test_tokenizer_writes_remapped_token_maps_of_every_image(discrete_dir):
    images = ImageStore.open(discrete_dir / paths.dataset_dir("openmoji"))
    maps = np.load(discrete_dir / paths.tokens_file("openmoji"))
    assert maps.shape == (len(images), images.resolution // 4, images.resolution // 4)
    metrics = json.loads((discrete_dir / paths.TOKENIZER_METRICS).read_text())
    assert 1 < metrics["codes_used"] <= metrics["codebook_size"] == 64
    used = np.load(discrete_dir / paths.TOKENIZER / "used_codes.npy")
    assert len(used) == metrics["codes_used"] and np.all(np.diff(used) > 0)
    assert maps.max() < metrics["codes_used"]  # remapped ids, not original codebook ids
    train_maps = maps[images.rows("train")]
    assert len(np.unique(train_maps)) == metrics["codes_used"]  # every kept code is used by a training image
    assert 0 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1


def test_train_discrete_records_its_run_and_loads_as_a_generator(discrete_dir, monkeypatch):
    monkeypatch.chdir(discrete_dir)
    config = read_checkpoint_config(paths.DISCRETE_MODEL)
    assert config["backbone"] == "discrete" and "mlflow_run_id" not in config  # the store finds it by content
    run = mlflow.get_run(_trained_by())
    assert run.data.tags["stage"] == "train_discrete" and run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "vlb_estimate")
    assert sorted(m.step for m in history) == [1, 2, 3]
    generator = load_generator(paths.DISCRETE_MODEL, backbone="discrete")
    assert generator.backbone == "discrete"  # its run: named by sample/evaluate from the store (next test)
    assert generator.conditioning.k == 3
    cond = np.random.default_rng(0).normal(size=(2, 4, generator.conditioning.embed_dim)).astype(np.float32)
    images = generator.sample(cond, guidance=8.0, steps=3, seeds=[0, 1])
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images[1:], generator.sample(cond[1:], guidance=8.0, steps=3, seeds=[1]))


def test_sample_and_evaluate_with_model_discrete_score_the_discrete_checkpoint(discrete_dir, monkeypatch):
    """``--model discrete``: the discrete checkpoint, its settings (lambda 8, strided steps, truncation), its
    own outputs and metrics file, MLflow runs tagged ``model=discrete``; nothing of the continuous model."""
    monkeypatch.chdir(discrete_dir)
    trained = _trained_by()
    sample.main(["--model", "discrete", "sample.discrete.steps=3", "sample.indexes=[openmoji]"])
    drawn = [json.loads(p.read_text()) for p in sorted((paths.samples_dir("discrete") / "openmoji").glob("0*.json"))]
    assert len(drawn) == 2 and {(d["backbone"], d["model_run_id"], d["guidance"], d["steps"], d["truncation"])
                                for d in drawn} == {("discrete", trained, 8.0, 3, 0.9)}
    evaluate.main(["--model", "discrete", "evaluate.count=4", "evaluate.batch_size=4", "evaluate.kid_subsets=2",
                   "evaluate.kid_subset_size=2", "evaluate.r_precision_candidates=2", "evaluate.grid_prompts=2",
                   "evaluate.grid.k=[0,3]", "evaluate.grid.index_fraction=[1.0]", "evaluate.discrete.steps=3",
                   "evaluate.judge=retrieval_encoder"])  # this tiny pipeline trains no judge
    out = paths.evaluate_dir("discrete")
    facts = json.loads((out / "evaluate.json").read_text())
    assert (facts["backbone"], facts["model_run_id"], facts["steps"], facts["truncation"]) == (
        "discrete", trained, 3, 0.9)
    sidecars = [json.loads(p.read_text()) for p in sorted((out / "k3-frac1-g8-openmoji").glob("0*.json"))]
    assert len(sidecars) == 4 and {(s["backbone"], s["model_run_id"], s["guidance"]) for s in sidecars} == {
        ("discrete", trained, 8.0)}
    metrics = json.loads(paths.evaluate_metrics("discrete").read_text())
    assert set(metrics) == {"k0-g8", "k3-frac1-g8-openmoji", "retrieval_baseline", "differences", "seconds"}
    assert not paths.evaluate_dir("continuous").exists() and not paths.evaluate_metrics("continuous").exists()
    runs = mlflow.search_runs(experiment_names=["tiny-pipeline"], output_format="list",
                              filter_string="tags.stage = 'evaluate' and tags.model = 'discrete'")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.run_name == "evaluate@discrete"
    points = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(points) == {"k0-g8", "k3-frac1-g8-openmoji", "retrieval_baseline"}
    assert points["k3-frac1-g8-openmoji"].data.params["model_run_id"] == trained
    assert parent[0].data.tags["dvc.stage"] == "evaluate@discrete"


def test_forced_tokenizer_and_train_discrete_train_again_to_the_same_bytes(discrete_dir, monkeypatch):
    """`dvc repro --force`: DVC deletes the outs, the state folder still holds the finished run, which is
    trained again (not "resumed" at its last step); same inputs, same thread count: the same bytes."""
    monkeypatch.chdir(discrete_dir)
    before = {folder: _folder_bytes(folder) for folder in (paths.TOKENIZER, paths.DISCRETE_MODEL)}
    first = _trained_by()
    for folder in before:
        shutil.rmtree(folder)
    tokenizer.main([])
    train_discrete.main([])
    assert {folder: _folder_bytes(folder) for folder in before} == before
    assert json.loads(paths.DISCRETE_METRICS.read_text())["steps_trained"] == 3
    runs = mlflow.search_runs(experiment_names=["tiny-pipeline"], output_format="list",
                              filter_string="tags.stage = 'tokenizer'", order_by=["attributes.start_time DESC"])
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss"))
    assert steps and steps[-1] == 4  # tokenizer.steps: trained to the end again
    assert _trained_by() not in ("", first)
