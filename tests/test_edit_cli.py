"""``knn-diffusion edit`` refuses bad input in a real subprocess: one ``error:`` line, exit 2, no traceback,
nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knn_diffusion.manipulation.model import BACKBONE, ManipulationDenoiser
from knn_diffusion.training.checkpoint import save_checkpoint
from tests.continuous_helpers import micro_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with a real (untrained) 16 px manipulation checkpoint and images of several kinds."""
    root = tmp_path_factory.mktemp("edit-cli")
    config = micro_config(resolution=16)
    save_checkpoint(root / "model", model=ManipulationDenoiser(config), model_config=config.to_dict(), step=0,
                    metadata={"backbone": BACKBONE})
    Image.fromarray(np.full((40, 24, 3), 200, np.uint8)).save(root / "ok.png")
    Image.fromarray(np.full((12, 30, 3), 200, np.uint8)).save(root / "small.png")
    (root / "notes.png").write_text("this is not an image\n")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return root


BAD_INPUTS = {
    "not an image": (["notes.png", "wears a hat"], "notes.png: not a readable image file"),
    "empty prompt": (["ok.png", "wears a hat", "  "], "prompt 2 is empty"),
    "missing model": (["ok.png", "wears a hat", "--checkpoint", "no-such-model"],
                      "no-such-model: no manipulation model"),
    "too small": (["small.png", "wears a hat"], "small.png: image is 30x12 px, too small"),
    "missing input": (["absent.png", "wears a hat"], "absent.png: input image not found"),
}


def test_edit_refuses_each_bad_input_with_one_line_and_writes_nothing(workspace):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = {}
    for case, (args, _) in BAD_INPUTS.items():  # concurrently: each is a fresh interpreter
        out = workspace / f"out-{case.replace(' ', '-')}"
        started[case] = (out, subprocess.Popen(
            [sys.executable, "-m", "knn_diffusion.cli", "edit", "--checkpoint", "model", *args, "--out", str(out)],
            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for case, (out, process) in started.items():
        stdout, stderr = process.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert process.returncode == 2, (case, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
        assert BAD_INPUTS[case][1] in lines[0], (case, lines[0])
        assert "Traceback" not in stderr + stdout
        assert not out.exists(), case
