"""DVC stage ``tokenizer``: the VQ model of the discrete backbone and the token maps of every image.

Trains a diffusers ``VQModel`` on the generator dataset's train split (reconstruction + commitment), or
loads ``tokenizer.pretrained`` (a taming-transformers VQGAN checkpoint, converted, or a VQModel folder);
remaps its vocabulary to the codes the training images use, and writes the model to
``models/tokenizer`` and the remapped token map of every image (row order) to ``data/tokens``.
MLflow gets the loss curve (when trained), codebook usage, held-out reconstruction PSNR/SSIM and a grid of
originals over reconstructions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from knn_diffusion.config import Params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.images import image_grid
from knn_diffusion.io import content_sha256, save_npy, write_json
from knn_diffusion.models.discrete.taming import find_config, load_pretrained_tokenizer
from knn_diffusion.models.discrete.vq_training import remap_tokenizer, tokenize, train_tokenizer
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)
HELD_OUT = 256  # val images measured for PSNR/SSIM
GRID = 32


def tokenizer_stage(params: Params) -> None:
    cfg = params.tokenizer
    name = params.data.generator_dataset
    images = ImageStore.open(paths.dataset_dir(name))
    train_rows = images.rows("train")
    held_out_rows = images.rows("val")[:HELD_OUT]
    if len(held_out_rows) == 0:
        held_out_rows = train_rows[:HELD_OUT]  # a dataset without a val split: measured on training images
    held_out = images[held_out_rows]
    with tracked("tokenizer", params) as run:
        start = time.perf_counter()
        if cfg.pretrained:
            full, source = pretrained_tokenizer(cfg.pretrained, cfg.pretrained_config, images.resolution)
            run.tags({f"pretrained_{key}": value for key, value in source.items()})
            tokenizer, report = remap_tokenizer(full, images.subset(train_rows), held_out, cfg.encode_batch)
        else:
            source = None
            tokenizer, report = train_tokenizer(cfg, images.subset(train_rows), held_out, images.resolution,
                                                on_log=lambda step, metrics: run.metrics(metrics, step=step))
        token_maps = tokenize(tokenizer, images, cfg.encode_batch)  # (N, h, w), every row
        seconds = time.perf_counter() - start
        tokenizer.save(paths.TOKENIZER, source)
        save_npy(paths.tokens_file(name), token_maps)
        shown = held_out[:GRID]
        run.image(image_grid(np.concatenate([shown, tokenizer.decode(tokenizer.encode(shown))]), columns=8),
                  "reconstructions.png")
        metrics = {"psnr": report.psnr, "ssim": report.ssim, "psnr_full_codebook": report.psnr_unmapped,
                   "codebook_size": report.codebook_size, "codes_used": report.codes_used,
                   "codebook_usage": report.usage_before,
                   "tokens_per_image": int(token_maps.shape[1] * token_maps.shape[2]), "seconds": round(seconds, 1)}
        if report.final_loss is not None:
            metrics["final_loss"] = report.final_loss
        run.metrics(metrics)
        write_json(paths.TOKENIZER_METRICS, metrics)
        log.info("codebook: %d of %d codes used (remapped to %d); held-out PSNR %.2f dB, SSIM %.3f",
                 report.codes_used, report.codebook_size, report.codes_used, report.psnr, report.ssim)


def pretrained_tokenizer(pretrained: str, config: str, resolution: int):
    """``tokenizer.pretrained``, every code (on the GPU when there is one), and what to record about its source."""
    start = time.perf_counter()
    full = load_pretrained_tokenizer(pretrained, config)
    factor = 2 ** (len(full.vq.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"tokenizer.pretrained={pretrained} downsamples by {factor}; data.resolution "
                         f"{resolution} is not a multiple of it")
    log.info("loaded %s (%d codes, %s, %dx downsampling) in %.1f s", pretrained, full.num_codes,
             "nearest-neighbour codes" if full.code_logits is None else "codes by logits (Gumbel)", factor,
             time.perf_counter() - start)
    source = {"pretrained": pretrained, "sha256": content_sha256(pretrained)}
    if not Path(pretrained).is_dir():
        source["config"] = str(Path(config) if config else find_config(Path(pretrained)))
    return full.to("cuda" if torch.cuda.is_available() else "cpu"), source


def main(argv: list[str] | None = None) -> None:
    run_stage("tokenizer", tokenizer_stage, argv, user_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    main()
