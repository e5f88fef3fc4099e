"""A stage's params are declared once, in dvc.yaml, and a stage can read nothing else."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import pytest
import yaml

from knn_diffusion.backbones import load_generator
from knn_diffusion.config import build_params, flatten
from knn_diffusion.models.continuous.generator import ContinuousGenerator
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.stages.common import (
    UndeclaredParamError,
    declared_params,
    dvc_stages,
    run_stage,
    stage_params,
    tracked,
)
from knn_diffusion.training.checkpoint import save_checkpoint
from tests.conftest import REPO
from tests.continuous_helpers import micro_config


def test_declared_params_come_from_dvc_yaml():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, entry in spec.items():
        if "matrix" not in entry:
            assert declared_params(stage) == entry.get("params", []), stage
    resolved = dvc_stages(REPO / "dvc.yaml")  # matrix stages: one per backbone, ${item.model} filled in
    assert {"sample@continuous", "sample@discrete", "evaluate@continuous", "evaluate@discrete"} <= set(resolved)
    for stage in ("sample", "evaluate"):
        declared = declared_params(f"{stage}@discrete")
        assert f"{stage}.discrete" in declared and not any("continuous" in key for key in declared)
        assert declared == resolved[f"{stage}@discrete"]["params"]


def test_reading_an_undeclared_key_fails_naming_stage_and_key():
    params = stage_params(build_params({}), "sample@continuous")
    assert params.sample.continuous.steps == 25 and params.retrieval.index_fraction == 1.0
    assert params.tracking.experiment  # where runs are logged: readable by every stage
    with pytest.raises(UndeclaredParamError, match="stage 'sample@continuous' reads params key 'index', which "
                                                   "dvc.yaml does not declare for it"):
        params.index.factory
    with pytest.raises(UndeclaredParamError, match="'sample.discrete'"):  # the other backbone's settings
        params.sample.discrete
    knn = stage_params(build_params({}), "knn")
    assert knn.data.generator_dataset == "openmoji"  # only this key of the data section is declared
    with pytest.raises(UndeclaredParamError, match="'data.resolution'"):
        knn.data.resolution
    with pytest.raises(AttributeError, match="read-only"):
        knn.knn = None
    copy = knn.knn
    copy.k_max = 1  # a copy: the stage's params stay as loaded
    assert knn.knn.k_max == 20


def test_stage_exits_2_with_one_line_on_an_undeclared_read(in_tmp, capsys):
    (in_tmp / "params.yaml").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        run_stage("ingest", lambda params: params.encoder.kind, [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stage 'ingest' reads params key 'encoder'") and "\n" not in err


def test_mlflow_run_logs_exactly_the_declared_params(in_tmp):
    params = stage_params(build_params({"tracking": {"experiment": "declared-params"}}), "knn")
    with tracked("knn", params) as run:
        run_id = run.id
    logged = mlflow.get_run(run_id).data.params
    assert set(logged) == set(flatten({"knn": json.loads(json.dumps(vars(params.knn)))})) | {"data.generator_dataset"}


def test_load_generator_reads_old_checkpoints_as_continuous(tmp_path):
    model = ContinuousDenoiser(micro_config())
    save_checkpoint(tmp_path / "old", model=model, model_config=dataclasses.asdict(micro_config()), step=1)
    generator = load_generator(tmp_path / "old")
    assert isinstance(generator, ContinuousGenerator) and generator.run_id == ""
    with pytest.raises(ValueError, match="a continuous checkpoint, but the discrete model was asked for"):
        load_generator(tmp_path / "old", backbone="discrete")
    save_checkpoint(tmp_path / "alien", model=model, model_config=dataclasses.asdict(micro_config()), step=1,
                    metadata={"backbone": "gan"})
    with pytest.raises(ValueError, match="backbone 'gan'"):
        load_generator(tmp_path / "alien")
