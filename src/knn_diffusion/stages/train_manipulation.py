"""DVC stage ``train_manipulation``: fine-tune the text-to-image model (``models/continuous``) into the
mask-free editing model on the ``manipulation_pairs`` pairs.

The model is the continuous one with the image to edit as extra input channels (zero-initialised, so
step 0 is the text-to-image model); its architecture, k and noise schedule are the text-to-image
model's. The shared training loop and the training stages' MLflow run, resume key, state folders and
metrics are reused as they are; previews are (I_manip | edit | I) rows of training pairs.
"""

from __future__ import annotations

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.io import content_sha256, read_json
from knn_diffusion.manipulation.model import trained_k
from knn_diffusion.manipulation.training import EditPairs, train_manipulation
from knn_diffusion.models.continuous.generator import load_denoiser
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage
from knn_diffusion.stages.train_common import (
    claim_state_dir,
    is_main_rank,
    load_training_inputs,
    relaunch_under_torchrun,
    run_key,
    tracked_training,
)
from knn_diffusion.training.checkpoint import EMA_FILE


def load_pairs(name: str, store, k: int) -> tuple[dict, np.ndarray]:
    """(the pairs file's arrays, each region's k neighbours as embedding-store positions)."""
    pairs_file = paths.manipulation_pairs_file(name)
    facts = read_json(pairs_file.with_suffix(".json"))
    if facts["encoder_fingerprint"] != store.fingerprint:
        raise ValueError(f"{pairs_file}: made with encoder {facts['encoder_fingerprint'][:16]}, the embeddings in "
                         f"{paths.embedding_dir(name)} with {store.fingerprint[:16]}; rerun manipulation_pairs")
    pairs = dict(np.load(pairs_file))
    have = pairs["region_neighbours"].shape[1]
    if have < k:
        raise ValueError(f"{paths.CONTINUOUS_MODEL} was trained with k={k} neighbours but {pairs_file} holds {have} "
                         f"per region: set manipulation_pairs.k >= {k}")
    positions = store.positions_of(pairs["region_neighbours"][:, :k].ravel()).reshape(len(pairs["rows"]), k)
    return pairs, positions


def train_stage(params: Params) -> None:
    cfg = params.train_manipulation
    relaunch_under_torchrun("train_manipulation", cfg.nproc_per_node)
    name = params.data.generator_dataset
    text_to_image = load_denoiser(paths.CONTINUOUS_MODEL)
    k = trained_k(text_to_image)
    inputs = load_training_inputs(name, "train_manipulation", 0)  # the leakage guard: pairs of train rows only
    pairs, neighbour_positions = load_pairs(name, inputs.store, k)
    outside = np.setdiff1d(pairs["rows"], inputs.train_rows)
    if len(outside):
        raise ValueError(f"{paths.manipulation_pairs_file(name)} holds pairs of {len(outside)} images outside the "
                         f"train split (e.g. row {outside[0]}); rerun manipulation_pairs")
    dataset = EditPairs(inputs.images.subset(pairs["rows"]), pairs["manipulated"], pairs["region_embeddings"],
                        inputs.store, neighbour_positions, k)
    key = run_key(cfg, inputs.images, pairs["rows"], inputs.store, paths.manipulation_pairs_file(name),
                  paths.CONTINUOUS_MODEL / EMA_FILE)
    state_dir = paths.MANIPULATION_STATE / key

    def train(on_log=None, on_images=None):
        return train_manipulation(cfg, text_to_image, dataset, state_dir, on_log=on_log, on_images=on_images,
                                  metadata={"text_to_image_sha256": content_sha256(paths.CONTINUOUS_MODEL)})

    if not is_main_rank():
        train()
        return
    claim_state_dir(paths.MANIPULATION_STATE, key, cfg.keep_runs)
    tracked_training("train_manipulation", params, cfg, state_dir, [], train, model_dir=paths.MANIPULATION_MODEL,
                     metrics_file=paths.MANIPULATION_METRICS, train_images=len(pairs["rows"]))


def main(argv: list[str] | None = None) -> None:
    run_stage("train_manipulation", train_stage, argv, user_errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
