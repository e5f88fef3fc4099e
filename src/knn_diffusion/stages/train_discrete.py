"""DVC stage ``train_discrete``: the VQ-Diffusion transformer conditioned on each image's embedding + its k
neighbours, trained on the ``tokenizer`` stage's token maps.

Same inputs, resume rules, torchrun relaunch and MLflow logging as ``train_continuous`` (shared in
``train_common`` and ``training/loop.py``); the final EMA model and a copy of the tokenizer (which
decodes its samples) go to ``models/discrete``.
"""

from __future__ import annotations

import shutil

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.models.discrete.generator import TOKENIZER_DIR
from knn_diffusion.models.discrete.training import train_discrete
from knn_diffusion.models.discrete.vq import Tokenizer
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
    cfg = params.train_discrete
    relaunch_under_torchrun("train_discrete", cfg.nproc_per_node)
    name = params.data.generator_dataset
    inputs = load_training_inputs(name, "train_discrete", cfg.k)
    tokens_file = paths.tokens_file(name)
    token_maps = np.load(tokens_file, mmap_mode="r")
    if len(token_maps) != len(inputs.images):
        raise ValueError(f"{tokens_file} holds {len(token_maps)} token maps for the {len(inputs.images)} images of "
                         f"{paths.dataset_dir(name)}; rerun the tokenizer stage")
    tokenizer = Tokenizer.load(paths.TOKENIZER)
    conditions, prompts = eval_conditions(inputs.store, inputs.train_rows, cfg.k)
    key = run_key(cfg, inputs.images, inputs.train_rows, inputs.store, inputs.neighbours_file, tokens_file)
    state_dir = paths.DISCRETE_STATE / key

    def train(on_log=None, on_images=None):
        return train_discrete(cfg, np.asarray(token_maps[inputs.train_rows]), tokenizer.num_codes, inputs.store,
                              inputs.self_positions, inputs.neighbour_positions, state_dir, tokenizer=tokenizer,
                              on_log=on_log, on_images=on_images, eval_conditions=conditions)

    if not is_main_rank():
        train()
        return
    claim_state_dir(paths.DISCRETE_STATE, key, cfg.keep_runs)
    tracked_training("train_discrete", params, cfg, state_dir, prompts, train, model_dir=paths.DISCRETE_MODEL,
                     metrics_file=paths.DISCRETE_METRICS, train_images=len(inputs.train_rows),
                     add_to_model=lambda folder: shutil.copytree(paths.TOKENIZER, folder / TOKENIZER_DIR))


def main(argv: list[str] | None = None) -> None:
    run_stage("train_discrete", train_stage, argv)


if __name__ == "__main__":
    main()
