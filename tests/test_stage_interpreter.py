"""A stage started by the wrong Python (DVC ran the system `python`) stops with a message saying so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from knn_diffusion.stages.common import run_stage


@pytest.fixture
def other_checkout(tmp_path, monkeypatch):
    """A checkout with its own venv and src/, which is not the environment running this test."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "src" / "knn_diffusion").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_refuses_a_python_that_is_not_the_checkouts_venv(other_checkout, capsys):
    ran = []
    with pytest.raises(SystemExit) as exit_info:
        run_stage("ingest", ran.append, [])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and ran == []
    assert err.startswith("error: stage 'ingest' was started by") and "\n" not in err
    assert sys.executable in err and str(other_checkout / ".venv" / "bin" / "python") in err
    assert "source .venv/bin/activate" in err and "dvc checkout ingest" in err


def test_stage_module_run_by_another_python_prints_no_traceback(other_checkout):
    done = subprocess.run([sys.executable, "-m", "knn_diffusion.stages.ingest"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: stage 'ingest' was started by"), done.stderr


def test_the_checkouts_own_venv_passes(tmp_path, monkeypatch):
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    from knn_diffusion.stages.common import check_interpreter

    check_interpreter("ingest")  # sys.prefix is the checkout's .venv
