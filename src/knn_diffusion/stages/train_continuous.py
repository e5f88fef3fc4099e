"""DVC stage ``train_continuous``: the U-Net DDPM conditioned on each image's embedding + its k neighbours.

Trains on images only: the generator dataset's train split, its own embeddings and the neighbour
table from the ``knn`` stage. Eval grids are sampled from held-out *text* prompts with neighbours
retrieved from the index, exactly as at inference. Step checkpoints live in ``checkpoints/`` (outside
DVC outputs) so a killed run resumes; the final EMA model is copied to ``models/continuous``.

Multi-GPU / multi-process: set ``train_continuous.nproc_per_node`` > 1 and the stage relaunches
itself under ``torchrun`` (gloo on CPU, nccl on GPU); only rank 0 logs to MLflow and writes outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from knn_diffusion.config import Params, to_plain
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import EmbeddingStore, load_text_embeddings
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.retrieval.search import Searcher, vectors_by_id
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.training.continuous import train_continuous

log = logging.getLogger(__name__)
EVAL_GRID = 16


def run_key(cfg, store: EmbeddingStore, neighbours: Path) -> str:
    """Step checkpoints are resumed only by a run of the same settings on the same inputs.

    Without this, changing e.g. the learning rate would make DVC rerun the stage, which would then
    "resume" the old run's final checkpoint and train nothing.
    """
    settings = {k: v for k, v in to_plain(cfg).items() if k not in ("nproc_per_node", "num_workers")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(store.fingerprint.encode())
    digest.update(neighbours.read_bytes())
    return digest.hexdigest()[:16]


def eval_conditions(params: Params, store: EmbeddingStore, k: int) -> tuple[np.ndarray, list[str]]:
    """(E, 1+k, d) conditions for fixed held-out prompts, neighbours retrieved from the index."""
    vectors, prompts = load_text_embeddings(paths.EVAL_PROMPTS, store.fingerprint, store.dim)
    pick = np.linspace(0, len(prompts) - 1, min(EVAL_GRID, len(prompts))).astype(int)
    queries = vectors[pick]
    if k == 0:
        return queries[:, None], [prompts[i] for i in pick]
    searcher = Searcher.open(paths.index_dir(params.data.generator_dataset), store.fingerprint, store.dim,
                             get_vectors=vectors_by_id(store.ids, store.get))
    found = searcher.search(queries, k, return_vectors=True)
    return np.concatenate([queries[:, None], found.vectors], axis=1), [prompts[i] for i in pick]


def train_stage(params: Params) -> None:
    cfg = params.train_continuous
    if cfg.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.nproc_per_node}", "-m", "knn_diffusion.stages.train_continuous", *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd))
    is_main = int(os.environ.get("RANK", "0")) == 0
    name = params.data.generator_dataset
    images = ImageStore.open(paths.dataset_dir(name))
    store = EmbeddingStore.open(paths.embedding_dir(name))
    table = np.load(paths.neighbours_file(name))
    if table["ids"].shape[1] < cfg.k:
        raise ValueError(f"train_continuous.k={cfg.k} but {paths.neighbours_file(name)} holds only "
                         f"{table['ids'].shape[1]} neighbours per image (knn.k_max)")
    train_rows = table["rows"]
    self_positions = store.positions_of(train_rows)
    neighbour_positions = store.positions_of(table["ids"].ravel()).reshape(table["ids"].shape)
    conditions, prompts = eval_conditions(params, store, cfg.k)

    state_dir = paths.CONTINUOUS_STATE / run_key(cfg, store, paths.neighbours_file(name))

    def train(on_log=None, on_images=None):
        return train_continuous(cfg, images.subset(train_rows), store, self_positions, neighbour_positions, state_dir,
                                on_log=on_log, on_images=on_images, eval_conditions=conditions)

    if not is_main:
        train()
        return
    with tracked("train_continuous", params, "train_continuous", "data.generator_dataset") as run:
        run.text("\n".join(prompts), "eval_prompts.txt")
        losses: list[float] = []

        def on_log(step: int, metrics: dict) -> None:
            losses.append(metrics["loss"])
            run.metrics(metrics, step=step)

        def on_images(step: int, grid: np.ndarray) -> None:
            run.image(grid, f"samples/step-{step:06d}.png")

        start = time.perf_counter()
        final = train(on_log, on_images)
        seconds = time.perf_counter() - start
        with atomic_dir(paths.CONTINUOUS_MODEL) as out:
            shutil.copytree(final, out, dirs_exist_ok=True)
        report = {"train_images": len(train_rows), "steps": cfg.max_steps, "seconds": round(seconds, 1),
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "min_loss": min(losses) if losses else None, "mlflow_run_id": run.id}
        write_json(paths.CONTINUOUS_METRICS, report)
        log.info("trained %d steps in %.0fs: loss %s -> %s", cfg.max_steps, seconds, report["first_loss"],
                 report["last_loss"])


def main(argv: list[str] | None = None) -> None:
    run_stage("train_continuous", train_stage, argv)


if __name__ == "__main__":
    main()
