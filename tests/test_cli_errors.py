"""`knn-diffusion generate` refuses bad input with one `error:` line and exit code 2, writes nothing to
--out on failure, and records the run id of the checkpoint it actually used."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knn_diffusion.cli import main as cli_main
from knn_diffusion.stages import paths


@pytest.fixture
def at_pipeline(tiny_pipeline, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    return tiny_pipeline


def _refused(capsys, out: Path, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", *argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists(), f"a failed run wrote {sorted(p.name for p in out.iterdir())}"
    return err


def test_empty_prompt(at_pipeline, tmp_path, capsys):
    assert "prompt 1 is empty" in _refused(capsys, tmp_path / "out", "")


def test_zero_steps(at_pipeline, tmp_path, capsys):
    assert "--steps 0: expected a number in [1, 1000]" in _refused(capsys, tmp_path / "out", "a cat",
                                                                    "--steps", "0")


def test_nan_guidance(at_pipeline, tmp_path, capsys):
    assert "--guidance nan: expected a number in [0, 50]" in _refused(capsys, tmp_path / "out", "a cat",
                                                                       "--guidance", "nan")


def test_wrong_dimension_image_embedding(at_pipeline, tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.ones(7, np.float32))
    err = _refused(capsys, tmp_path / "out", "--image-embedding-from", str(tmp_path / "e.npy"))
    assert "d=7" in err and "d=32" in err


def test_zero_norm_image_embedding(at_pipeline, tmp_path, capsys):
    rows = np.ones((3, 8), dtype=np.float32)
    rows[1] = 0.0
    np.save(tmp_path / "e.npy", rows)
    err = _refused(capsys, tmp_path / "out", "--image-embedding-from", str(tmp_path / "e.npy"))
    assert "embedding 1 is all zeros" in err


def test_nan_image_embedding(at_pipeline, tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.full(32, np.nan, np.float32))
    assert "NaN" in _refused(capsys, tmp_path / "out", "--image-embedding-from", str(tmp_path / "e.npy"))


def test_missing_index_path(at_pipeline, tmp_path, capsys):
    assert "no-such-index" in _refused(capsys, tmp_path / "out", "a cat", "--index", str(tmp_path / "no-such-index"))


@pytest.mark.parametrize("checkpoint", ["missing", "not-a-checkpoint", "garbage-weights"])
def test_bad_checkpoint(at_pipeline, tmp_path, capsys, checkpoint):
    path = tmp_path / checkpoint
    if checkpoint == "not-a-checkpoint":
        shutil.copytree(paths.ENCODER, path)
    elif checkpoint == "garbage-weights":
        shutil.copytree(paths.CONTINUOUS_MODEL, path)
        (path / "ema.safetensors").write_bytes(b"not safetensors")
    assert str(path) in _refused(capsys, tmp_path / "out", "a cat", "--checkpoint", str(path))


def test_k_larger_than_the_index(at_pipeline, tmp_path, capsys):
    assert "k=250" in _refused(capsys, tmp_path / "out", "a cat", "--k", "250")


def test_failed_run_keeps_an_earlier_output(at_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    cli_main(["generate", "a cat", "--steps", "1", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit):
        cli_main(["generate", "a dog", "--steps", "1", "--k", "250", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        cli_main(["generate", "a dog", "--steps", "1", "--out", str(tmp_path / "mine")])
    assert "is not the folder of an earlier generate run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sidecar_names_the_run_of_the_checkpoint_used(at_pipeline, tmp_path):
    """--checkpoint elsewhere: the run that trained those bytes, found in the store by the folder's content
    hash (the folder names no run); a model no run in the store made is named by none."""
    import mlflow

    from knn_diffusion.io import content_sha256
    from knn_diffusion.tracking import MODEL_HASH_TAG

    other = tmp_path / "other-model"
    shutil.copytree(paths.CONTINUOUS_MODEL, other)
    assert "mlflow_run_id" not in json.loads((other / "config.json").read_text())
    cli_main(["generate", "a cat", "--steps", "1", "--checkpoint", str(other), "--out", str(tmp_path / "out")])
    record = json.loads(next((tmp_path / "out").glob("0000-*.json")).read_text())
    trained = mlflow.get_run(record["model_run_id"])
    assert trained.data.tags["stage"] == "train_continuous" and trained.info.status == "FINISHED"
    assert trained.data.tags[MODEL_HASH_TAG] == content_sha256(other)
    (other / "notes.txt").write_text("changed")  # other bytes: no run in the store made them
    cli_main(["generate", "a cat", "--steps", "1", "--checkpoint", str(other), "--out", str(tmp_path / "out2")])
    assert json.loads(next((tmp_path / "out2").glob("0000-*.json")).read_text())["model_run_id"] == ""


def test_console_shows_no_traceback(at_pipeline, tmp_path):
    done = subprocess.run([sys.executable, "-m", "knn_diffusion.cli", "generate", "", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: prompt 1 is empty: give text to generate from "
                                                "(or only --image-embedding-from)"]


def test_served_backend_with_no_service_listening(at_pipeline, tmp_path, capsys):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    err = _refused(capsys, tmp_path / "out", "a cat", "--set", "retrieval.backend=served",
                   "--set", f"retrieval.served_url={url}")
    assert err == (f"error: retrieval.served_url={url}: /indices-list got no answer (ConnectionError); "
                   "is `clip-retrieval back` running there?")
