"""Training the VQ tokenizer (reconstruction + codebook/commitment), then remapping to the used codes.

The codebook starts from encoder outputs of the first batch (data-dependent init), so few entries
are dead from the start; whatever stays unused is dropped by the remap. Library code: the stage
wires ``on_log`` to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm

from knn_diffusion.models.discrete.config import TokenizerConfig
from knn_diffusion.models.discrete.vq import Tokenizer, build_vq, to_unit_range, used_codes


@dataclass
class TokenizerReport:
    codebook_size: int
    codes_used: int          # entries used by the training images (the remapped vocabulary size)
    usage_before: float      # fraction of the codebook used
    psnr: float              # reconstruction through the remapped tokens, held-out images
    ssim: float
    psnr_unmapped: float     # through the full codebook (what remapping costs, if anything)
    final_loss: float | None  # None: a pretrained VQ, nothing trained


def _batches(count: int, size: int):
    for start in range(0, count, size):
        yield np.arange(start, min(start + size, count))


def train_vq(cfg: TokenizerConfig, images: Sequence, resolution: int,
             on_log: Callable[[int, dict], None] | None = None):
    """images: uint8 (N, H, W, 3), indexable by an int array. Returns the trained diffusers VQModel."""
    torch.manual_seed(cfg.seed)
    vq = build_vq(cfg.vq, resolution).train()
    vq.quantize.legacy, vq.quantize.beta = False, cfg.commitment  # beta on the commitment term
    optimizer = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    loss_value = float("nan")
    for step in tqdm(range(cfg.steps), desc="tokenizer"):
        rows = np.sort(rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False))
        x = to_unit_range(np.asarray(images[rows]))  # (B, 3, H, W)
        latents = vq.encode(x).latents  # (B, e, h, w)
        if step == 0:
            with torch.no_grad():  # codebook <- random encoder outputs
                flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
                seeded = torch.Generator().manual_seed(cfg.seed)
                pick = torch.randint(0, len(flat), (cfg.vq.codebook_size,), generator=seeded)
                vq.quantize.embedding.weight.copy_(flat[pick] + 1e-3 * torch.randn_like(flat[pick]))
        decoded = vq.decode(latents)
        recon = F.mse_loss(decoded.sample, x)
        loss = recon + decoded.commit_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if on_log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            on_log(step + 1, {"loss": loss_value, "reconstruction_mse": recon.item()})
    return vq.eval(), loss_value


@torch.no_grad()
def code_counts(tokenizer: Tokenizer, images: Sequence, batch: int) -> np.ndarray:
    """How often each of ``tokenizer``'s codes is chosen over ``images``."""
    counts = np.zeros(tokenizer.num_codes, dtype=np.int64)
    for rows in _batches(len(images), batch):
        ids = tokenizer.encode(np.asarray(images[rows]))
        counts += np.bincount(ids.reshape(-1).cpu().numpy(), minlength=len(counts))
    return counts


def _unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def reconstruction_quality(tokenizer: Tokenizer, full: Tokenizer, images: np.ndarray,
                           batch: int) -> tuple[float, float, float]:
    """(PSNR, SSIM) through the remapped tokens and PSNR through the full codebook, pixels in [0, 1]."""
    psnr, ssim, psnr_full = (PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0),
                             PeakSignalNoiseRatio(data_range=1.0))
    for rows in _batches(len(images), batch):
        original = np.asarray(images[rows])
        target, remapped = _unit(original), _unit(tokenizer.decode(tokenizer.encode(original)))
        psnr.update(remapped, target)
        ssim.update(remapped, target)
        psnr_full.update(_unit(full.decode(full.encode(original))), target)
    return psnr.compute().item(), ssim.compute().item(), psnr_full.compute().item()


def remap_tokenizer(full: Tokenizer, train_images: Sequence, held_out: np.ndarray, batch: int,
                    final_loss: float | None = None) -> tuple[Tokenizer, TokenizerReport]:
    """Restrict a trained or pretrained VQ (``full``: every code, :meth:`Tokenizer.unremapped`) to the codes
    ``train_images`` use, measure on ``held_out`` (uint8)."""
    counts = code_counts(full, train_images, batch)
    tokenizer = full.remapped(used_codes(counts))
    psnr, ssim, psnr_full = reconstruction_quality(tokenizer, full, held_out, batch)
    report = TokenizerReport(codebook_size=len(counts), codes_used=tokenizer.num_codes,
                             usage_before=tokenizer.num_codes / len(counts), psnr=psnr, ssim=ssim,
                             psnr_unmapped=psnr_full, final_loss=final_loss)
    return tokenizer, report


def train_tokenizer(cfg: TokenizerConfig, train_images: Sequence, held_out: np.ndarray, resolution: int,
                    on_log: Callable[[int, dict], None] | None = None) -> tuple[Tokenizer, TokenizerReport]:
    """Train the VQ on ``train_images``, remap to the codes they use, measure on ``held_out`` (uint8)."""
    vq, final_loss = train_vq(cfg, train_images, resolution, on_log)
    return remap_tokenizer(Tokenizer.unremapped(vq), train_images, held_out, cfg.encode_batch, final_loss)


@torch.no_grad()
def tokenize(tokenizer: Tokenizer, images: Sequence, batch: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> remapped token maps (N, h, w), uint16."""
    maps = [tokenizer.encode(np.asarray(images[rows])).cpu().numpy() for rows in _batches(len(images), batch)]
    return np.concatenate(maps).astype(np.uint16)
