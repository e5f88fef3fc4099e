"""Every stage, in DAG order, on a few dozen real glyphs with tiny models (the demo in miniature)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import yaml

from knn_diffusion.cli import main as cli_main
from knn_diffusion.retrieval.inference import SCORES_FILE
from knn_diffusion.stages import embed, encoder, paths
from tests.conftest import TINY_PIPELINE_RUN, copy_outputs

TINY = {
    "data": {"datasets": {"openmoji": {"source": "openmoji", "limit": 120},
                          "noto": {"source": "noto", "limit": 60, "optional": True}}},
    "encoder": {"vision": {"width": 32, "layers": 1, "head_width": 16, "embed_dim": 32},
                "alignment": {"steps": 6, "batch_size": 16, "warmup": 1, "checkpoint_every": 3}},
    "embed": {"shard_size": 50},
    "index": {"tune_queries": 20},
    "knn": {"k_max": 10},  # the largest k any backbone trains with by default
    "train_continuous": {"k": 3, "batch_size": 4, "max_steps": 3, "warmup_steps": 1, "checkpoint_every": 2,
                         "sample_every": 0, "log_every": 1, "sampling": {"steps": 2}},
    "sample": {"prompts": ["an emoji of a red heart", "an emoji of a cat"], "continuous": {"steps": 2}},
}


def _runs() -> list:
    """The stage runs of the session's ``tiny_pipeline`` (all stages once on ``TINY``; tests read its outputs)."""
    return mlflow.search_runs(experiment_names=["tiny-pipeline"], output_format="list",
                              filter_string=f"tags.pipeline_run = '{TINY_PIPELINE_RUN}'")


def test_every_stage_logged_one_finished_run(tiny_pipeline):
    runs = {r.info.run_name: r for r in _runs()}
    assert sorted(runs) == sorted(r.info.run_name for r in _runs())  # one run each
    assert set(runs) == {"ingest", "encoder", "embed", "index", "knn", "train_continuous", "sample@continuous"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["train_continuous"].data.metrics["loss"] > 0


def test_neighbour_table_has_no_self_or_duplicates(tiny_pipeline):
    report = json.loads((tiny_pipeline / paths.KNN_METRICS).read_text())
    assert report["self_matches"] == 0 and report["duplicate_ids"] == 0 and report["same_content_hash"] == 0
    table = np.load(tiny_pipeline / paths.neighbours_file("openmoji"))
    assert table["ids"].shape == (len(table["rows"]), 10)
    assert (table["ids"] != table["rows"][:, None]).all()


def test_samples_for_own_and_swapped_index(tiny_pipeline):
    for name in ("openmoji", "noto"):
        folder = tiny_pipeline / paths.samples_dir("continuous") / name
        sidecars = sorted(folder.glob("0*.json"))
        assert len(sidecars) == 2 and (folder / "grid.png").is_file()
        record = json.loads(sidecars[0].read_text())
        assert record["k"] == 3 and len(record["neighbour_ids"]) == 3
    noto_sidecars = sorted((tiny_pipeline / paths.samples_dir("continuous") / "noto").glob("0*.json"))
    noto_ids = json.loads(noto_sidecars[0].read_text())
    noto_index_ids = np.load(tiny_pipeline / paths.index_dir("noto") / SCORES_FILE)["ids"]
    assert set(noto_ids["neighbour_ids"]) <= set(noto_index_ids.tolist())


def test_generate_cli_with_index_swap_and_global_score_filter(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    out = tmp_path / "gen"
    cli_main(["generate", "an emoji of a dog", "--index", "noto", "--steps", "2", "--k", "2", "--out", str(out),
              "--set", "retrieval.global_score_filter.low=0.5"])
    record = json.loads(next(out.glob("0000-*.json")).read_text())
    column = np.load(tiny_pipeline / paths.index_dir("noto") / SCORES_FILE)
    threshold = np.quantile(column["scores"], 0.5)
    by_id = dict(zip(column["ids"].tolist(), column["scores"].tolist()))
    assert len(record["neighbour_ids"]) == 2
    assert all(by_id[i] >= threshold for i in record["neighbour_ids"])


def test_generate_refuses_an_index_from_another_encoder(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """Swapping in an index built in another embedding space fails, naming both fingerprints."""
    import shutil

    monkeypatch.chdir(tiny_pipeline)
    alien = tmp_path / "alien-index"
    shutil.copytree(paths.index_dir("noto"), alien)
    sidecar = json.loads((alien / "index.json").read_text())
    ours, sidecar["fingerprint"] = sidecar["fingerprint"], "f" * 64
    (alien / "index.json").write_text(json.dumps(sidecar))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "an emoji of a dog", "--index", str(alien), "--steps", "1",
                  "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ")
    assert "f" * 64 in err and ours in err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # starts a Dask LocalCluster (~22 s): `make test-slow`
def test_dask_parallel_embed_matches_serial_bytes(tiny_pipeline, tmp_path, monkeypatch):
    """embed.workers > 0 fans shards out over a LocalCluster through Prefect; the result is identical."""
    import shutil

    root = copy_outputs(tiny_pipeline, tmp_path / "repo", str(paths.INGEST), str(paths.ENCODER), str(paths.EMBED))
    monkeypatch.chdir(root)
    serial = tmp_path / "serial-embed"
    shutil.move(paths.EMBED, serial)
    embed.main(["embed.workers=2"])
    for name in ("openmoji", "noto"):
        files = sorted(p.name for p in (serial / name).glob("*.npy"))
        assert len(files) >= 4, files  # several shards of 50 each
        for file in files:
            assert (paths.embedding_dir(name) / file).read_bytes() == (serial / name / file).read_bytes(), file


def test_pretrained_open_clip_from_a_local_checkpoint(tiny_pipeline, tmp_path, monkeypatch):
    """encoder.kind=open_clip: nothing trained, recall measured, embeddings in that model's space."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from knn_diffusion.encoders.factory import load_open_clip
    from knn_diffusion.encoders.store import EmbeddingStore

    arch = tmp_path / "tiny-e2e-clip.json"
    arch.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in load_open_clip(str(arch)).model.state_dict().items()}, weights)
    shutil.copytree(tiny_pipeline / paths.INGEST, tmp_path / paths.INGEST)
    params = dict(TINY, encoder={"kind": "open_clip", "model_name": str(arch), "pretrained": str(weights)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    encoder.main([])
    embed.main([])
    report = json.loads(paths.ENCODER_METRICS.read_text())
    assert report["trained"] == 0 and 0 <= report["recall@10"] <= 1 and report["chance@10"] > 0
    sidecar = json.loads((paths.ENCODER / "encoder.json").read_text())
    assert sidecar["kind"] == "open_clip" and sidecar["corpus"] == "pretrained"
    store = EmbeddingStore.open(paths.embedding_dir("openmoji"))
    assert store.dim == 16 and store.fingerprint == sidecar["fingerprint"]
