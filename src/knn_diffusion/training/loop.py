"""The training loop both backbones share: DDP, EMA, autocast, atomic checkpoints, exact resume, callbacks.

A backbone (``ContinuousBackbone``, ``DiscreteBackbone``) supplies only what differs: how to build
its model, the loss of one batch and how to draw preview samples. Runs on one CPU/GPU or under
``torchrun`` (DDP; gloo on CPU, nccl on GPU); only rank 0 logs, samples and saves. Everything random
in a step (batch, timesteps, noise, condition dropout) is a function of (seed, rank, step), so a run
killed and resumed from its last checkpoint continues with exactly the same losses.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from knn_diffusion.config_fields import to_plain
from knn_diffusion.images import image_grid
from knn_diffusion.training.checkpoint import (
    list_checkpoints,
    prune_checkpoints,
    restore_training_state,
    resume_step,
    save_checkpoint,
    step_checkpoint_path,
)
from knn_diffusion.training.config import Precision
from knn_diffusion.training.data import StepBatchSampler, make_loader
from knn_diffusion.training.ema import EMA

log = logging.getLogger(__name__)
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


class Backbone(Protocol):
    """What a generator brings to the shared loop."""

    name: str           # recorded in every checkpoint ("continuous" | "discrete"): loaders dispatch on it
    model_config: Any   # has .to_dict(); rebuilds the architecture

    def build(self) -> torch.nn.Module:
        """A fresh model (the loop seeds torch first, so every rank starts identical)."""

    def loss(self, model: torch.nn.Module, train_model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             generator: torch.Generator, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, extra scalars to log) of one (targets, cond) batch; ``train_model`` may be the DDP wrapper."""

    def preview(self, ema_model: torch.nn.Module, amp_dtype: torch.dtype | None) -> np.ndarray | None:
        """uint8 (E, H, W, 3) samples for the MLflow grid, or None."""


def train_loop(backbone: Backbone, cfg: Any, dataset, out_dir: str | os.PathLike, *, on_log: LogFn | None = None,
               on_images: ImagesFn | None = None, metadata: dict | None = None) -> Path:
    """Train (or resume) ``backbone`` on ``dataset`` and return the final checkpoint ``out_dir/final``.

    ``cfg``: a backbone's training section (seed, lr, weight_decay, warmup_steps, max_steps,
    batch_size, ema_decay, precision, grad_clip, checkpoint_every, keep_checkpoints, log_every,
    sample_every, num_workers). ``dataset`` answers ``__getitems__(indices) -> (targets, cond)``.
    Step checkpoints go to ``out_dir/checkpoints``. An unfinished run there is resumed; a finished
    one (its newest checkpoint at ``max_steps``) is not: being called again means train again.
    ``metadata`` (e.g. the image resolution) is recorded in every checkpoint's config.json: values of the
    inputs only, never of the run (a retrain of the same inputs must give the same bytes).
    """
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    ctx = init_distributed()
    try:
        amp_dtype = autocast_dtype(cfg.precision, ctx.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = backbone.build().to(ctx.device)
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

        sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, cfg.max_steps,
                                   ctx.rank, ctx.world_size)
        loader = make_loader(dataset, sampler, cfg.num_workers, pin_memory=ctx.device.type == "cuda")
        metadata = {**(metadata or {}), "backbone": backbone.name, "train": to_plain(cfg)}
        model_config = backbone.model_config.to_dict()

        def save(step: int) -> None:
            save_checkpoint(step_checkpoint_path(checkpoints, step), model=model, model_config=model_config,
                            step=step, ema=ema.model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            scaler=scaler, metadata=metadata)
            prune_checkpoints(checkpoints, cfg.keep_checkpoints)

        def log_samples(step: int) -> None:
            if on_images is not None and (images := backbone.preview(ema.model, amp_dtype)) is not None:
                on_images(step, image_grid(images))

        model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        extra_sums: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not ctx.is_main, desc=f"train_{backbone.name}")
        for step, batch in zip(range(start_step, cfg.max_steps), loader):
            batch = tuple(t.to(ctx.device, non_blocking=True) for t in batch)
            loss, extras = backbone.loss(model, train_model, batch, step_generator(cfg.seed, ctx.rank, step), amp_dtype)
            optimizer_step(loss, model, optimizer, scaler, cfg.grad_clip)
            lr_scheduler.step()
            done = step + 1
            ema.update(model, done)
            loss_sum += loss.detach()
            for key, value in extras.items():
                extra_sums[key] = extra_sums.get(key, 0.0) + value
            window_steps += 1
            progress.update(1)

            if done % cfg.log_every == 0 or done == cfg.max_steps:
                if ctx.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= ctx.world_size
                mean_loss = loss_sum.item() / window_steps
                elapsed = time.perf_counter() - window_start
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"train_{backbone.name}: loss became {mean_loss} at step {done}")
                if ctx.is_main:
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    if on_log is not None:
                        on_log(done, {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                                      "images_per_s": window_steps * cfg.batch_size / elapsed,
                                      **{key: value / window_steps for key, value in extra_sums.items()}})
                loss_sum.zero_()
                extra_sums.clear()
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
            save_checkpoint(final, model=model, model_config=model_config, step=cfg.max_steps,
                            ema=ema.model, metadata=metadata)
        if ctx.world_size > 1:
            dist.barrier()  # every rank returns only once the final checkpoint exists
        return final
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
