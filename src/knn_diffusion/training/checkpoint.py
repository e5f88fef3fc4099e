"""Checkpoints that rebuild the same architecture and resume a run exactly.

One checkpoint is a directory, written atomically (a killed run leaves the previous one intact)::

    model.safetensors   the trained weights
    ema.safetensors     the EMA weights (what sampling uses by default)
    config.json         {"model": <constructor config>, "step": int, ...caller's metadata}
    state.pt            optimizer, LR scheduler, grad scaler and torch RNG states; tensors and
                        primitives only, loaded with ``torch.load(weights_only=True)``

Data order and per-step noise are functions of (seed, step), so these states are all a resume needs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from knn_diffusion.io import atomic_dir, read_json, write_json

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
STEP_PREFIX = "step-"


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, model_config: dict, step: int,
                    ema: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    lr_scheduler=None, scaler: torch.amp.GradScaler | None = None,
                    metadata: dict | None = None) -> Path:
    """Write a checkpoint directory atomically; training state is optional (final exports skip it)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(_tensors(model), tmp / MODEL_FILE)
        if ema is not None:
            save_file(_tensors(ema), tmp / EMA_FILE)
        write_json(tmp / CONFIG_FILE, {"model": model_config, "step": step, **(metadata or {})})
        if optimizer is not None:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            torch.save(state, tmp / STATE_FILE)
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
    config = read_json(path / CONFIG_FILE)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "step" not in config:
        raise ValueError(f"{path / CONFIG_FILE}: not a knn-diffusion checkpoint config (expected 'model' and 'step')")
    return config


def load_weights(path: str | os.PathLike, model: nn.Module, *, ema: bool = True) -> None:
    """Load the EMA (default) or the raw weights into ``model``; falls back to raw when no EMA file."""
    path = Path(path)
    file = path / EMA_FILE if ema and (path / EMA_FILE).is_file() else path / MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: weights file missing from checkpoint")
    try:
        model.load_state_dict(load_file(file, device="cpu"))
    except (SafetensorError, RuntimeError) as err:  # unreadable file, or weights of another architecture
        raise ValueError(f"{file}: cannot load these weights into the model its {CONFIG_FILE} describes "
                         f"({str(err).splitlines()[0]})") from None


def restore_training_state(path: str | os.PathLike, *, model: nn.Module, ema: nn.Module | None,
                           optimizer: torch.optim.Optimizer, lr_scheduler=None,
                           scaler: torch.amp.GradScaler | None = None) -> int:
    """Bring a freshly built run to the checkpoint's state; returns the number of steps done."""
    path = Path(path)
    load_weights(path, model, ema=False)
    if ema is not None:
        load_weights(path, ema, ema=True)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def step_checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints in ``folder``, oldest first (half-written temp dirs are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file() and (p / CONFIG_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The number of optimizer steps a checkpoint has done."""
    return int(read_checkpoint_config(path)["step"])


def resume_step(folder: str | os.PathLike, max_steps: int) -> int:
    """Where a run of ``max_steps`` continues from: its newest step checkpoint in ``folder``, or 0 when
    there is none or that run finished (calling a finished run again means training again)."""
    found = list_checkpoints(folder)
    step = checkpoint_step(found[-1]) if found else 0
    return step if step < max_steps else 0


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def prune_run_dirs(folder: str | os.PathLike, keep: int, current: str | os.PathLike) -> list[Path]:
    """Delete all but the ``keep`` most recently used run folders in ``folder`` (``current`` always
    stays and counts as one of them); returns the deleted ones."""
    folder, current = Path(folder), Path(current).resolve()
    if not folder.is_dir():
        return []
    others = sorted((p for p in folder.iterdir() if p.is_dir() and p.resolve() != current),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    stale = others[max(keep - 1, 0):]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return stale
