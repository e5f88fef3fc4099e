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

from knn_diffusion.config import Params
from knn_diffusion.models.continuous.training import train_continuous
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage
from knn_diffusion.stages.train_common import (
    claim_state_dir,
    eval_conditions,
    is_main_rank,
    load_training_inputs,
    relaunch_under_torchrun,
    run_key,
    tracked_training,
)


def train_stage(params: Params) -> None:
    cfg = params.train_continuous
    relaunch_under_torchrun("train_continuous", cfg.nproc_per_node)
    name = params.data.generator_dataset
    inputs = load_training_inputs(name, "train_continuous", cfg.k)
    conditions, prompts = eval_conditions(inputs.store, inputs.train_rows, cfg.k)
    key = run_key(cfg, inputs.images, inputs.train_rows, inputs.store, inputs.neighbours_file)
    state_dir = paths.CONTINUOUS_STATE / key

    def train(on_log=None, on_images=None):
        return train_continuous(cfg, inputs.images.subset(inputs.train_rows), inputs.store, inputs.self_positions,
                                inputs.neighbour_positions, state_dir, on_log=on_log, on_images=on_images,
                                eval_conditions=conditions)

    if not is_main_rank():
        train()
        return
    claim_state_dir(paths.CONTINUOUS_STATE, key, cfg.keep_runs)
    tracked_training("train_continuous", params, cfg, state_dir, prompts, train, model_dir=paths.CONTINUOUS_MODEL,
                     metrics_file=paths.CONTINUOUS_METRICS, train_images=len(inputs.train_rows))


def main(argv: list[str] | None = None) -> None:
    run_stage("train_continuous", train_stage, argv)


if __name__ == "__main__":
    main()
