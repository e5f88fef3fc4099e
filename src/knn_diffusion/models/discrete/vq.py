"""The image tokenizer: a diffusers ``VQModel`` plus the list of codebook entries actually used.

A trained VQ codebook leaves many entries dead (the paper's VQGAN uses 2,887 of its codes). The
transformer's vocabulary is only the used ones: :class:`Tokenizer` encodes to *remapped* ids
0..U-1 (nearest used entry) and decodes them back through the original codebook. A Gumbel-softmax
VQGAN (taming's ``GumbelVQ``) picks codes by a 1x1 projection of the latents instead (``code_logits``):
then the used code with the largest logit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from safetensors.torch import load_file, save_file
from torch import nn

from knn_diffusion.config_fields import ConfigError
from knn_diffusion.io import atomic_dir, save_npy, write_json
from knn_diffusion.models.discrete.config import VQConfig

CODES_FILE = "used_codes.npy"
LOGITS_FILE = "code_logits.safetensors"  # only for a Gumbel-softmax VQ: the 1x1 conv latents -> code logits
SOURCE_FILE = "source.json"


def build_vq(config: VQConfig, resolution: int) -> VQModel:
    if resolution % config.downsampling:
        raise ConfigError(f"tokenizer: resolution {resolution} is not divisible by the downsampling "
                          f"{config.downsampling} of block_out_channels {config.block_out_channels}")
    for channels in config.block_out_channels:
        if channels % config.norm_num_groups:
            raise ConfigError(f"tokenizer: block_out_channels entry {channels} is not divisible by "
                              f"norm_num_groups={config.norm_num_groups}")
    levels = len(config.block_out_channels)
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(config.block_out_channels),
                   layers_per_block=config.layers_per_block, latent_channels=config.embed_dim,
                   num_vq_embeddings=config.codebook_size, vq_embed_dim=config.embed_dim,
                   norm_num_groups=config.norm_num_groups, sample_size=resolution,
                   mid_block_add_attention=config.mid_attention)


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Tokenizer(nn.Module):
    """Images <-> remapped token maps (B, h, w) with ids in [0, num_codes)."""

    def __init__(self, vq: VQModel, used_codes: np.ndarray | torch.Tensor, code_logits: nn.Conv2d | None = None):
        super().__init__()
        self.vq = vq.eval().requires_grad_(False)
        self.code_logits = None if code_logits is None else code_logits.to(vq.device).eval().requires_grad_(False)
        self.register_buffer("used", torch.as_tensor(np.asarray(used_codes), dtype=torch.long, device=vq.device),
                             persistent=False)

    @classmethod
    def unremapped(cls, vq: VQModel, code_logits: nn.Conv2d | None = None) -> "Tokenizer":
        """Every codebook entry in its own id: what remapping starts from."""
        return cls(vq, np.arange(vq.config.num_vq_embeddings), code_logits)

    def remapped(self, used_codes: np.ndarray) -> "Tokenizer":
        """The same VQ restricted to ``used_codes`` (ids of this tokenizer's codebook)."""
        return Tokenizer(self.vq, self.used.cpu().numpy()[used_codes], self.code_logits)

    @property
    def num_codes(self) -> int:
        return len(self.used)

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> token ids (B, h, w): the nearest *used* codebook entry per cell (the
        largest used logit for a Gumbel VQ: the noise-free choice where taming samples with Gumbel noise)."""
        device = self.used.device
        latents = self.vq.encode(to_unit_range(images).to(device)).latents  # (B, e, h, w)
        if self.code_logits is not None:
            weight, bias = self.code_logits.weight[self.used], self.code_logits.bias[self.used]  # (U, e, 1, 1), (U,)
            return torch.nn.functional.conv2d(latents, weight, bias).argmax(dim=1)  # (B, U, h, w) -> (B, h, w)
        b, e, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, e)  # (B*h*w, e)
        codebook = self.vq.quantize.embedding.weight[self.used]  # (U, e)
        return torch.cdist(flat, codebook).argmin(dim=1).view(b, h, w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """token ids (B, h, w) -> uint8 images (B, H, W, 3)."""
        quant = self.vq.quantize.embedding(self.used[tokens.to(self.used.device)])  # (B, h, w, e)
        decoded = self.vq.decode(quant.permute(0, 3, 1, 2).contiguous(), force_not_quantize=True).sample
        return to_uint8(decoded)

    def save(self, path: str | os.PathLike, source: dict | None = None) -> Path:
        """A directory readable by :meth:`load`: diffusers' ``save_pretrained`` files + the used codes
        (+ ``source.json``: where pretrained weights came from, e.g. a checkpoint's path and sha256)."""
        with atomic_dir(path) as tmp:
            self.vq.save_pretrained(tmp, safe_serialization=True)
            save_npy(tmp / CODES_FILE, self.used.cpu().numpy())
            if source is not None:
                write_json(tmp / SOURCE_FILE, source)
            if self.code_logits is not None:
                state = {key: value.contiguous().cpu() for key, value in self.code_logits.state_dict().items()}
                save_file(state, tmp / LOGITS_FILE)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not (path / CODES_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a tokenizer directory (no {CODES_FILE})")
        return cls(VQModel.from_pretrained(path, low_cpu_mem_usage=False), np.load(path / CODES_FILE),
                   load_code_logits(path))


def load_code_logits(folder: Path) -> nn.Conv2d | None:
    """A Gumbel VQ's code projection saved beside its VQModel files; None for a nearest-neighbour VQ."""
    if not (folder / LOGITS_FILE).is_file():
        return None
    return code_logits_layer(load_file(folder / LOGITS_FILE))


def code_logits_layer(state: dict[str, torch.Tensor]) -> nn.Conv2d:
    """The 1x1 conv latents (e channels) -> logits over the codebook, from its weight (V, e, 1, 1) and bias (V,)."""
    codes, channels = state["weight"].shape[:2]
    layer = nn.Conv2d(channels, codes, 1)
    layer.load_state_dict(state)
    return layer


def used_codes(counts: np.ndarray) -> np.ndarray:
    """Original codebook ids with at least one use, ascending (the remapped id is the position here)."""
    return np.flatnonzero(counts).astype(np.int64)
