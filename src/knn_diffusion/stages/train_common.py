"""What both training stages (``train_continuous``, ``train_discrete``) share around the training loop.

The generator dataset's train split, its embeddings and the ``knn`` stage's neighbour table (with
the leakage guard), preview conditions from held-out *text* prompts, the resume key of a run's
state folder, the relaunch under ``torchrun``, and the MLflow run that logs curves and grids and
writes the final model and metrics.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from knn_diffusion.config import to_plain
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import EmbeddingStore, load_text_embeddings
from knn_diffusion.io import atomic_dir, content_sha256, write_json
from knn_diffusion.retrieval.search import exact_neighbours
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import tracked
from knn_diffusion.tracking import MODEL_HASH_TAG
from knn_diffusion.training.checkpoint import prune_run_dirs, resume_step

log = logging.getLogger(__name__)
EVAL_GRID = 16

# Settings that change what is logged or how fast, never the trained weights: a killed run resumes
# across a change of these. (nproc_per_node is not among them: each rank draws its own noise.)
NOT_IN_RUN_KEY = ("sample_every", "sampling", "log_every", "checkpoint_every", "keep_checkpoints", "keep_runs",
                  "num_workers")


@dataclass
class TrainingInputs:
    images: ImageStore
    store: EmbeddingStore
    neighbours_file: Path
    train_rows: np.ndarray           # (N,) image rows of the train split, in the knn table's order
    self_positions: np.ndarray       # (N,) each image's own row in the embedding store
    neighbour_positions: np.ndarray  # (N, k_max) its neighbours' rows there


def load_training_inputs(dataset: str, stage: str, k: int) -> TrainingInputs:
    images = ImageStore.open(paths.dataset_dir(dataset))
    store = EmbeddingStore.open(paths.embedding_dir(dataset))
    neighbours_file = paths.neighbours_file(dataset)
    table = np.load(neighbours_file)
    if table["ids"].shape[1] < k:
        raise ValueError(f"{stage}.k={k} but {neighbours_file} holds only {table['ids'].shape[1]} neighbours "
                         "per image (knn.k_max)")
    train_rows = table["rows"]
    outside = np.setdiff1d(train_rows, images.rows("train"))
    if len(outside):  # leakage guard: held-out (val/test) images never reach training
        raise ValueError(f"{neighbours_file} lists {len(outside)} images outside the train split of "
                         f"{paths.dataset_dir(dataset)} (e.g. row {outside[0]}); rerun the knn stage")
    return TrainingInputs(images, store, neighbours_file, train_rows, store.positions_of(train_rows),
                          store.positions_of(table["ids"].ravel()).reshape(table["ids"].shape))


def run_key(cfg, images: ImageStore, train_rows: np.ndarray, store: EmbeddingStore, neighbours: Path,
            *more_inputs: Path) -> str:
    """Step checkpoints are resumed only by a run of the same weight-relevant settings on the same inputs.

    Without this, changing e.g. the learning rate would make DVC rerun the stage, which would then
    "resume" the old run's final checkpoint and train nothing. Inputs: the training images' content
    hashes (pixels), the encoder fingerprint (with the pixels, the embeddings), the neighbour table
    and ``more_inputs`` (e.g. the token maps).
    """
    settings = {k: v for k, v in to_plain(cfg).items() if k not in NOT_IN_RUN_KEY}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    hashes = images.manifest.set_index("row")["content_hash"].loc[train_rows]
    digest.update("\n".join(hashes.astype(str)).encode())
    digest.update(store.fingerprint.encode())
    for path in (neighbours, *more_inputs):
        digest.update(Path(path).read_bytes())
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


def relaunch_under_torchrun(stage: str, nproc_per_node: int) -> None:
    """With nproc_per_node > 1 and not yet under torchrun: run this stage as that many ranks, then exit."""
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               "-m", f"knn_diffusion.stages.{stage}", *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd))


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def claim_state_dir(root: Path, key: str, keep_runs: int) -> Path:
    """``root/key``, marked most recently used; older run folders beyond ``keep_runs`` are removed."""
    state_dir = root / key
    state_dir.mkdir(parents=True, exist_ok=True)
    os.utime(state_dir)  # the most recently used state folder is kept longest
    for stale in prune_run_dirs(root, keep_runs, state_dir):
        log.info("removed old training state %s (keep_runs=%d)", stale, keep_runs)
    return state_dir


def tracked_training(stage: str, params, cfg, state_dir: Path, prompts: list[str], train: Callable[..., Path], *,
                     model_dir: Path, metrics_file: Path, train_images: int,
                     add_to_model: Callable[[Path], None] | None = None) -> None:
    """Run ``train(on_log, on_images)`` inside the stage's MLflow run (rank 0), then copy the final
    checkpoint to ``model_dir`` (plus ``add_to_model(folder)``), tag the run with the folder's content hash
    (the folder names no run: its bytes depend only on its inputs) and write the stage's metrics."""
    with tracked(stage, params) as run:
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
        final = train(on_log, on_images)
        seconds = time.perf_counter() - start
        with atomic_dir(model_dir) as out:
            shutil.copytree(final, out, dirs_exist_ok=True)
            if add_to_model is not None:
                add_to_model(out)
        run.tags({MODEL_HASH_TAG: content_sha256(model_dir)})  # how sample/evaluate find this run
        first, last = min(losses), max(losses)  # log steps; a finished step always logs its loss
        report = {"train_images": train_images, "steps": cfg.max_steps, "seconds": round(seconds, 1),
                  "steps_trained": cfg.max_steps - resumed_at, "first_loss": losses[first], "last_loss": losses[last],
                  "min_loss": min(losses.values())}
        write_json(metrics_file, report)
        log.info("trained steps %d-%d in %.0fs: loss %.4f -> %.4f", resumed_at + 1, cfg.max_steps, seconds,
                 report["first_loss"], report["last_loss"])
