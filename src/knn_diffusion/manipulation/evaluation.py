"""Scoring edits: text correspondence (CLIP-score gain over the input) and identity preservation (SSIM /
PSNR against the input outside the region that changed).

There is no ground-truth mask, so the changed region is estimated from the difference map: a pixel
changed when its mean absolute RGB difference to the input exceeds ``threshold`` (0-255). Identity is
then measured where nothing changed; the changed fraction itself is reported beside it, because a
system that changes everything leaves little "outside" to score (the text-to-image baseline).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP = 100.0  # dB: an identical region (MSE 0) scores this instead of infinity


def changed_region(inputs: np.ndarray, outputs: np.ndarray, threshold: float) -> np.ndarray:
    """bool (N, H, W): mean |output - input| over RGB above ``threshold``."""
    return np.abs(outputs.astype(np.float32) - inputs.astype(np.float32)).mean(axis=-1) > threshold


def psnr(mse: np.ndarray) -> np.ndarray:
    return np.minimum(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), PSNR_CAP)


def identity_scores(inputs: np.ndarray, outputs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per image: changed_fraction, ssim_outside, psnr_outside (NaN when everything changed), ssim, psnr."""
    changed = changed_region(inputs, outputs, threshold)  # (N, H, W)
    to_tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).double()  # noqa: E731
    _, ssim_map = structural_similarity_index_measure(to_tensor(outputs), to_tensor(inputs), data_range=255.0,
                                                      return_full_image=True, reduction="none")
    ssim_pixels = ssim_map.mean(dim=1).numpy()  # (N, H, W)
    squared = ((outputs.astype(np.float64) - inputs.astype(np.float64)) ** 2).mean(axis=-1)  # (N, H, W)
    kept = (~changed).reshape(len(changed), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ssim_outside = np.where(kept > 0, (ssim_pixels * ~changed).reshape(len(changed), -1).sum(1) / kept, np.nan)
        mse_outside = np.where(kept > 0, (squared * ~changed).reshape(len(changed), -1).sum(1) / kept, np.nan)
    return {"changed_fraction": changed.reshape(len(changed), -1).mean(axis=1), "ssim_outside": ssim_outside,
            "psnr_outside": np.where(np.isnan(mse_outside), np.nan, psnr(mse_outside)),
            "ssim": ssim_pixels.reshape(len(changed), -1).mean(axis=1),
            "psnr": psnr(squared.reshape(len(changed), -1).mean(1))}


def text_scores(judge, inputs: np.ndarray, outputs: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per image: clip_score (cosine of output and prompt under ``judge``) and clip_gain (minus the input's)."""
    texts = judge.encode_texts(prompts)  # (N, d), unit
    after = np.einsum("nd,nd->n", judge.encode_images(outputs), texts)
    before = np.einsum("nd,nd->n", judge.encode_images(inputs), texts)
    return {"clip_score": after, "clip_gain": after - before}


def summarise(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the images (NaN entries left out), plus how many had an unchanged part to score."""
    out = {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
           for name, values in scores.items()}
    out["scored_outside"] = int(np.isfinite(scores["ssim_outside"]).sum())
    return out
