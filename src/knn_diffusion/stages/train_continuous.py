"""DVC stage ``train_continuous``: the U-Net DDPM conditioned on each image's embedding + its k neighbours.

Trains on images only: the generator dataset's train split, its own embeddings and the neighbour
table from the ``knn`` stage. Eval grids are sampled from held-out *text* prompts with neighbours
found by exact search among the training images (no index read: an index rebuild never retrains).
Step checkpoints live in ``checkpoints/`` (outside DVC outputs) so a killed run resumes; the final
EMA model is copied to ``models/continuous``.

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
from knn_diffusion.retrieval.search import exact_neighbours
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.training.checkpoint import prune_run_dirs, resume_step
from knn_diffusion.training.continuous import train_continuous

log = logging.getLogger(__name__)
EVAL_GRID = 16


# Settings that change what is logged or how fast, never the trained weights: a killed run resumes
# across a change of these. (nproc_per_node is not among them: each rank draws its own noise.)
NOT_IN_RUN_KEY = ("sample_every", "sampling", "log_every", "checkpoint_every", "keep_checkpoints", "keep_runs",
                  "num_workers")


def run_key(cfg, images: ImageStore, train_rows: np.ndarray, store: EmbeddingStore, neighbours: Path) -> str:
    """Step checkpoints are resumed only by a run of the same weight-relevant settings on the same inputs.

    Without this, changing e.g. the learning rate would make DVC rerun the stage, which would then
    "resume" the old run's final checkpoint and train nothing. Inputs: the training images' content
    hashes (pixels), the encoder fingerprint (with the pixels, the embeddings) and the neighbour table.
    """
    settings = {k: v for k, v in to_plain(cfg).items() if k not in NOT_IN_RUN_KEY}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    hashes = images.manifest.set_index("row")["content_hash"].loc[train_rows]
    digest.update("\n".join(hashes.astype(str)).encode())
    digest.update(store.fingerprint.encode())
    digest.update(neighbours.read_bytes())
    return digest.hexdigest()[:16]


def eval_conditions(store: EmbeddingStore, train_rows: np.ndarray, k: int) -> tuple[np.ndarray | None, list[str]]:
    """(E, 1+k, d) conditions for fixed held-out text prompts, neighbours found by exact search among
    the training images (the knn table's rows), so the previews need no index: rebuilding or rolling
    back the index never reruns training. None when there are no prompts (an image-only dataset)."""
    vectors, prompts = load_text_embeddings(paths.EVAL_PROMPTS, store.fingerprint, store.dim)
    if not prompts:
        log.info("no preview grids: the generator dataset has no held-out captions to prompt with")
        return None, []
    pick = np.linspace(0, len(prompts) - 1, min(EVAL_GRID, len(prompts))).astype(int)
    queries = vectors[pick]  # (E, d)
    if k == 0:
        return queries[:, None], [prompts[i] for i in pick]
    train_vectors = store.get(store.positions_of(train_rows))  # (N, d)
    _, ids = exact_neighbours(train_vectors, train_rows, queries, k)  # (E, k) image rows
    found = store.get(store.positions_of(ids.ravel())).reshape(len(pick), k, -1)  # (E, k, d)
    return np.concatenate([queries[:, None], found], axis=1), [prompts[i] for i in pick]


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
    outside = np.setdiff1d(train_rows, images.rows("train"))
    if len(outside):  # leakage guard: held-out (val/test) images never reach training
        raise ValueError(f"{paths.neighbours_file(name)} lists {len(outside)} images outside the train split of "
                         f"{paths.dataset_dir(name)} (e.g. row {outside[0]}); rerun the knn stage")
    self_positions = store.positions_of(train_rows)
    neighbour_positions = store.positions_of(table["ids"].ravel()).reshape(table["ids"].shape)
    conditions, prompts = eval_conditions(store, train_rows, cfg.k)

    state_dir = paths.CONTINUOUS_STATE / run_key(cfg, images, train_rows, store, paths.neighbours_file(name))

    def train(on_log=None, on_images=None, metadata=None):
        return train_continuous(cfg, images.subset(train_rows), store, self_positions, neighbour_positions, state_dir,
                                on_log=on_log, on_images=on_images, eval_conditions=conditions, metadata=metadata)

    if not is_main:
        train()
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    os.utime(state_dir)  # the most recently used state folder is kept longest
    for stale in prune_run_dirs(paths.CONTINUOUS_STATE, cfg.keep_runs, state_dir):
        log.info("removed old training state %s (train_continuous.keep_runs=%d)", stale, cfg.keep_runs)
    with tracked("train_continuous", params, "train_continuous", "data.generator_dataset") as run:
        run.text("\n".join(prompts), "eval_prompts.txt")
        run.tags({"state_dir": str(state_dir)})
        losses: dict[int, float] = {}

        def on_log(step: int, metrics: dict) -> None:
            losses[step] = metrics["loss"]
            run.metrics(metrics, step=step)

        def on_images(step: int, grid: np.ndarray) -> None:
            run.image(grid, f"samples/step-{step:06d}.png")

        resumed_at = resume_step(state_dir / "checkpoints", cfg.max_steps)
        start = time.perf_counter()
        final = train(on_log, on_images, metadata={"mlflow_run_id": run.id})
        seconds = time.perf_counter() - start
        with atomic_dir(paths.CONTINUOUS_MODEL) as out:
            shutil.copytree(final, out, dirs_exist_ok=True)
        first, last = min(losses), max(losses)  # log steps; a finished step always logs its loss
        report = {"train_images": len(train_rows), "steps": cfg.max_steps, "seconds": round(seconds, 1),
                  "steps_trained": cfg.max_steps - resumed_at, "first_loss": losses[first], "last_loss": losses[last],
                  "min_loss": min(losses.values())}
        write_json(paths.CONTINUOUS_METRICS, report)
        log.info("trained steps %d-%d in %.0fs: loss %.4f -> %.4f", resumed_at + 1, cfg.max_steps, seconds,
                 report["first_loss"], report["last_loss"])


def main(argv: list[str] | None = None) -> None:
    run_stage("train_continuous", train_stage, argv)


if __name__ == "__main__":
    main()
