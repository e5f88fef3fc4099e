"""Training loop of the continuous kNN-Diffusion model (epsilon prediction, paper eq. 4 / 6.8).

The model only ever sees images: y = (f_img(x0), knn_img(x0, k)). Runs on one CPU/GPU or under
``torchrun`` (DDP; gloo on CPU, nccl on GPU); only rank 0 logs, samples and saves. Everything random
in a step (batch, timesteps, noise, condition dropout, flips) is a function of (seed, rank, step), so
a run killed and resumed from its last checkpoint continues with exactly the same losses.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from knn_diffusion.config import to_plain
from knn_diffusion.models.conditioning import drop_conditions
from knn_diffusion.models.config import (BetaSchedule, ConditioningConfig, ConditioningVariant, DenoiserConfig,
                                         NoiseConfig, load_unet_preset)
from knn_diffusion.models.unet import ContinuousDenoiser
from knn_diffusion.images import image_grid
from knn_diffusion.sampling import sample
from knn_diffusion.training.checkpoint import (list_checkpoints, prune_checkpoints, restore_training_state,
                                               resume_step, save_checkpoint, step_checkpoint_path)
from knn_diffusion.training.config import ContinuousTrainConfig, Precision
from knn_diffusion.training.data import ConditionedImages, EmbeddingSource, StepBatchSampler, make_loader
from knn_diffusion.training.ema import EMA

log = logging.getLogger(__name__)
BACKBONE = "continuous"  # recorded in every checkpoint, so a loader can tell the backbones apart
LogFn = Callable[[int, dict], None]
ImagesFn = Callable[[int, np.ndarray], None]


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Rank/world from torchrun's environment; a process group only when there are several ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, device, owns_group)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32."""
    precision = Precision(precision)
    if device.type != "cuda" or precision == Precision.fp32:
        if precision in (Precision.bf16, Precision.fp16) and device.type != "cuda":
            raise ValueError(f"precision '{precision.value}' needs a GPU; use 'auto' or 'fp32' on the CPU")
        return None
    if precision == Precision.auto:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == Precision.bf16 else torch.float16


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator that draws every random choice of one rank's step."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def denoiser_config(cfg: ContinuousTrainConfig, resolution: int, embed_dim: int) -> DenoiserConfig:
    """The architecture this training config builds for data of the given resolution and embedding size."""
    variant = ConditioningVariant(cfg.variant)
    k = 0 if variant == ConditioningVariant.no_knn else cfg.k
    return DenoiserConfig(
        unet=load_unet_preset(cfg.preset, resolution),
        conditioning=ConditioningConfig(variant=variant, embed_dim=embed_dim, k=k),
        noise=NoiseConfig(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=BetaSchedule(cfg.beta_schedule)),
    )


def diffusion_loss(model: torch.nn.Module, noise_scheduler: DDPMScheduler, images: torch.Tensor,
                   cond: torch.Tensor, generator: torch.Generator, cond_dropout: float, hflip: bool,
                   amp_dtype: torch.dtype | None) -> torch.Tensor:
    """|| eps - eps_theta(x_t, t, y) ||^2 for one batch; all randomness from ``generator``."""
    batch = images.shape[0]
    if hflip:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    cond = drop_conditions(cond, cond_dropout, generator)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(images.device)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        predicted = model(noisy, timesteps, cond)
    return F.mse_loss(predicted.float(), noise)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, grad_clip: float) -> None:
    """Backward, (unscale,) clip the gradient norm, step; fp16 goes through the grad scaler."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_continuous(cfg: ContinuousTrainConfig, images: Sequence, embeddings: EmbeddingSource,
                     self_rows: np.ndarray, neighbours: np.ndarray, out_dir: str | os.PathLike,
                     on_log: LogFn | None = None, on_images: ImagesFn | None = None,
                     eval_conditions: np.ndarray | None = None, metadata: dict | None = None) -> Path:
    """Train (or resume) and return the final checkpoint directory ``out_dir/final``.

    ``images``: uint8 (N, H, W, 3), indexable by an int array (an ImageStore or a memmap).
    ``embeddings.get(rows) -> (n, d)`` over the index collection; ``self_rows`` (N,) each image's own
    row there, ``neighbours`` (N, k_max) its precomputed neighbours' rows. ``eval_conditions``
    (E, 1+k, d) are sampled into a grid every ``cfg.sample_every`` steps and at the end.
    Step checkpoints go to ``out_dir/checkpoints``. An unfinished run there is resumed; a finished
    one (its newest checkpoint at ``max_steps``) is not: being called again means train again.
    ``metadata`` (e.g. the MLflow run id) is recorded in every checkpoint's config.json.
    """
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    ctx = init_distributed()
    try:
        resolution = int(np.asarray(images[np.zeros(1, dtype=np.int64)]).shape[1])
        embed_dim = int(np.asarray(embeddings.get(np.asarray(self_rows[:1], dtype=np.int64))).shape[1])
        model_config = denoiser_config(cfg, resolution, embed_dim)
        amp_dtype = autocast_dtype(cfg.precision, ctx.device)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = ContinuousDenoiser(model_config).to(ctx.device)
        ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        start_step = 0
        if resume_step(checkpoints, cfg.max_steps) > 0:
            start_step = restore_training_state(list_checkpoints(checkpoints)[-1], model=model, ema=ema.model,
                                                optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler)
            if ctx.is_main:
                log.info("resuming %s at step %d of %d", checkpoints, start_step, cfg.max_steps)
        elif list_checkpoints(checkpoints):
            if ctx.world_size > 1:
                dist.barrier()  # every rank has decided not to resume before rank 0 deletes
            if ctx.is_main:
                log.info("%s holds a finished run; training again from step 0", checkpoints)
                shutil.rmtree(checkpoints)
        train_model = model
        if ctx.world_size > 1:
            train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                        beta_schedule=BetaSchedule(cfg.beta_schedule).value)

        dataset = ConditionedImages(images, embeddings, self_rows, neighbours, model_config.conditioning.k)
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, cfg.max_steps,
                                   ctx.rank, ctx.world_size)
        loader = make_loader(dataset, sampler, cfg.num_workers, pin_memory=ctx.device.type == "cuda")
        metadata = {**(metadata or {}), "backbone": BACKBONE, "train": to_plain(cfg), "resolution": resolution,
                    "embed_dim": embed_dim}

        def save(step: int) -> None:
            save_checkpoint(step_checkpoint_path(checkpoints, step), model=model, model_config=model_config.to_dict(),
                            step=step, ema=ema.model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            scaler=scaler, metadata=metadata)
            prune_checkpoints(checkpoints, cfg.keep_checkpoints)

        def log_samples(step: int) -> None:
            if on_images is not None and eval_conditions is not None:
                s = cfg.sampling
                grid = sample(ema.model, eval_conditions, guidance=s.guidance, scheduler=s.scheduler,
                              steps=s.steps, seed=s.seed, autocast_dtype=amp_dtype)
                on_images(step, image_grid(grid))

        model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        window_steps, window_start = 0, time.perf_counter()
        progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not ctx.is_main, desc="train_continuous")
        for step, (batch_images, batch_cond) in zip(range(start_step, cfg.max_steps), loader):
            batch_images = batch_images.to(ctx.device, non_blocking=True)
            batch_cond = batch_cond.to(ctx.device, non_blocking=True)
            loss = diffusion_loss(train_model, noise_scheduler, batch_images, batch_cond,
                                  step_generator(cfg.seed, ctx.rank, step), cfg.cond_dropout, cfg.hflip, amp_dtype)
            optimizer_step(loss, model, optimizer, scaler, cfg.grad_clip)
            lr_scheduler.step()
            done = step + 1
            ema.update(model, done)
            loss_sum += loss.detach()
            window_steps += 1
            progress.update(1)

            if done % cfg.log_every == 0 or done == cfg.max_steps:
                if ctx.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= ctx.world_size
                mean_loss = loss_sum.item() / window_steps
                elapsed = time.perf_counter() - window_start
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"train_continuous: loss became {mean_loss} at step {done}")
                if ctx.is_main:
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    if on_log is not None:
                        on_log(done, {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                                      "images_per_s": window_steps * cfg.batch_size / elapsed})
                loss_sum.zero_()
                window_steps, window_start = 0, time.perf_counter()
            paused = time.perf_counter()  # saving and sampling do not count against throughput
            if ctx.is_main and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps):
                save(done)
            if ctx.is_main and cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.max_steps:
                log_samples(done)
            window_start += time.perf_counter() - paused
        progress.close()

        final = out_dir / "final"
        if ctx.is_main:
            log_samples(cfg.max_steps)
            save_checkpoint(final, model=model, model_config=model_config.to_dict(), step=cfg.max_steps,
                            ema=ema.model, metadata=metadata)
        if ctx.world_size > 1:
            dist.barrier()  # every rank returns only once the final checkpoint exists
        return final
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
