"""A real 2-process DDP run on the CPU (gloo), launched with torchrun as the pipeline does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from knn_diffusion.models.continuous.generator import load_denoiser
from knn_diffusion.training.checkpoint import read_checkpoint_config
from tests.continuous_helpers import write_micro_preset

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from tests.continuous_helpers import ArrayEmbeddings, ring_neighbours, square_images, unit_embeddings
    from pathlib import Path
    from knn_diffusion.models.continuous.config import ContinuousTrainConfig
    from knn_diffusion.models.continuous.training import train_continuous

    out = Path(sys.argv[1])
    cfg = ContinuousTrainConfig(preset=str(out.parent / "unet-micro.json"), k=2, batch_size=8, max_steps=40,
                                lr=3e-3, warmup_steps=5, checkpoint_every=20, log_every=5, sample_every=0)
    losses = {{}}
    final = train_continuous(cfg, square_images(16, 8), ArrayEmbeddings(unit_embeddings(16, 16)), np.arange(16),
                             ring_neighbours(16, 2), out, on_log=lambda s, m: losses.__setitem__(s, m["loss"]))
    rank = os.environ["RANK"]
    (out / f"result-{{rank}}.json").write_text(json.dumps({{"final": str(final), "losses": losses,
                                                           "world": os.environ["WORLD_SIZE"]}}))
""")


def test_two_process_gloo_run_learns_and_saves_once(tmp_path):
    write_micro_preset(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = [json.loads((tmp_path / "run" / f"result-{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == "2" for r in results)
    assert results[1]["losses"] == {}  # only rank 0 logs
    losses = [results[0]["losses"][str(s)] for s in range(5, 41, 5)]
    assert losses[-1] < 0.5 * losses[0], losses

    final = Path(results[0]["final"])
    assert results[1]["final"] == str(final)  # both ranks return once rank 0 has written it
    model = load_denoiser(final)
    assert read_checkpoint_config(final)["step"] == 40
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    assert np.isfinite(losses).all()
