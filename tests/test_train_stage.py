"""The train_continuous stage is honest: no index read, force retrains, resumes only across settings
that leave the weights unchanged, prunes old state, records the run that produced the model."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import yaml

from knn_diffusion.config import load_params
from knn_diffusion.stages import paths, train_common, train_continuous
from knn_diffusion.tracking import model_run_id
from knn_diffusion.training.checkpoint import read_checkpoint_config
from tests.conftest import copy_outputs
from tests.continuous_helpers import write_micro_preset

TRAIN_INPUTS = (str(paths.INGEST), str(paths.EMBED), str(paths.KNN))  # no data/index


@pytest.fixture
def train_dir(tiny_pipeline, tmp_path, monkeypatch):
    """The training stage's declared inputs only: ingest, embed, knn (and params.yaml, with the micro U-Net)."""
    root = copy_outputs(tiny_pipeline, tmp_path / "repo", *TRAIN_INPUTS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_continuous"]["preset"] = write_micro_preset(tmp_path)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    return root


def _model_bytes() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths.CONTINUOUS_MODEL.iterdir()}


def _report() -> dict:
    return json.loads(paths.CONTINUOUS_METRICS.read_text())


def _loss_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss"))


def _trained_by() -> str:
    params = load_params("params.yaml")
    return model_run_id(paths.CONTINUOUS_MODEL, params.tracking.experiment, params.tracking.tracking_uri)


def test_trains_without_an_index_and_records_its_run(train_dir):
    assert not paths.INDEX.exists()
    train_continuous.main([])
    config = read_checkpoint_config(paths.CONTINUOUS_MODEL)
    assert config["backbone"] == "continuous" and "mlflow_run_id" not in config  # bytes of its inputs only
    run = mlflow.get_run(_trained_by())
    assert run.data.tags["stage"] == "train_continuous" and run.info.status == "FINISHED"
    report = _report()
    assert report["steps_trained"] == report["steps"] == 3
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in report.values()), report
    assert _loss_steps(run.info.run_id) == [1, 2, 3]


def test_forced_rerun_trains_again_to_the_same_bytes(train_dir):
    """`dvc repro --force`: DVC deletes the out, the state folder still holds the finished run. The same
    inputs at the same thread count give the same bytes (so DVC's run cache can serve them)."""
    train_continuous.main([])
    first, first_bytes = _trained_by(), _model_bytes()
    shutil.rmtree(paths.CONTINUOUS_MODEL)
    train_continuous.main([])
    second = _trained_by()
    assert second != first and _model_bytes() == first_bytes
    report = _report()
    assert report["steps_trained"] == 3 and report["first_loss"] > 0 and report["last_loss"] > 0, report
    assert _loss_steps(second) == [1, 2, 3]


class Killed(Exception):
    pass


def test_killed_run_resumes_across_logging_and_sampling_changes(train_dir, monkeypatch):
    steps = ["train_continuous.max_steps=4", "train_continuous.checkpoint_every=2"]
    real = train_continuous.train_continuous

    def killed_after_step_three(*args, on_log=None, **kwargs):
        def log(step, metrics):
            on_log(step, metrics)
            if step == 3:
                raise Killed
        return real(*args, on_log=log, **kwargs)

    monkeypatch.setattr(train_continuous, "train_continuous", killed_after_step_three)
    with pytest.raises(Killed):
        train_continuous.main(steps)
    monkeypatch.setattr(train_continuous, "train_continuous", real)
    train_continuous.main([*steps, "train_continuous.sample_every=1", "train_continuous.sampling.steps=3",
                           "train_continuous.sampling.guidance=1.5", "train_continuous.log_every=2",
                           "train_continuous.keep_checkpoints=1", "train_continuous.num_workers=1"])
    assert _report()["steps_trained"] == 2  # resumed from the step-2 checkpoint
    assert len(list(paths.CONTINUOUS_STATE.iterdir())) == 1


def test_resume_key_changes_with_every_weight_setting(train_dir):
    from knn_diffusion.data.store import ImageStore
    from knn_diffusion.encoders.store import EmbeddingStore

    def key(*overrides):
        params = load_params("params.yaml", overrides)
        images = ImageStore.open(paths.dataset_dir("openmoji"))
        table = paths.neighbours_file("openmoji")
        return train_common.run_key(params.train_continuous, images, np.load(table)["rows"],
                                         EmbeddingStore.open(paths.embedding_dir("openmoji")), table)

    base = key()
    for same in ("sample_every=7", "sampling.steps=9", "sampling.guidance=1.0", "log_every=3",
                 "checkpoint_every=5", "keep_checkpoints=4", "keep_runs=5", "num_workers=2"):
        assert key(f"train_continuous.{same}") == base, same
    for other in ("lr=0.002", "cond_dropout=0.1", "nproc_per_node=2", "max_steps=5", "seed=1", "ema_decay=0.99"):
        assert key(f"train_continuous.{other}") != base, other


def test_old_state_folders_are_pruned(train_dir):
    for lr in ("0.001", "0.002", "0.003"):
        train_continuous.main([f"train_continuous.lr={lr}", "train_continuous.max_steps=1",
                               "train_continuous.keep_runs=2"])
    assert len(list(paths.CONTINUOUS_STATE.iterdir())) == 2
    train_continuous.main(["train_continuous.lr=0.004", "train_continuous.max_steps=1",
                           "train_continuous.keep_runs=1"])
    assert len(list(paths.CONTINUOUS_STATE.iterdir())) == 1


def test_cond_dropout_defaults_to_zero_as_in_the_paper():
    from knn_diffusion.models.continuous.config import ContinuousTrainConfig
    from tests.conftest import REPO

    assert ContinuousTrainConfig().cond_dropout == 0
    assert load_params(REPO / "params.yaml").train_continuous.cond_dropout == 0
