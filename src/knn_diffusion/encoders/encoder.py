"""One interface over every CLIP this project can use: uint8 images and strings in, unit vectors out.

Downstream stages (embed, retrieval, training, evaluation) only see :class:`Encoder`, so a pretrained
open_clip ViT-B-32 and the offline aligned model are interchangeable. The ``fingerprint`` (a hash of the
architecture identity and every weight byte) is what stages record next to embeddings, so two embedding
spaces are never mixed silently.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _image_size(preprocess_cfg: dict) -> int:
    size = preprocess_cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square model input size {size} is not supported")
        size = size[0]
    return int(size)


def as_uint8_batch(images: Any) -> torch.Tensor:
    """Check and wrap a (N, H, W, 3) uint8 numpy array or tensor (no copy for numpy)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a uint8 numpy array or tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images


def _string_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
    return list(texts)


class Encoder(nn.Module):
    """An open_clip model + its tokenizer, with batched, normalised, no-grad encode helpers.

    ``description`` says where the model came from (for logs and embedding metadata); it does not
    enter the fingerprint, so moving a checkpoint file does not change the embedding space's identity.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 description: dict[str, Any]):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = dict(description)
        # Imported here: open_clip's package import takes ~4 s, which every stage that only reads stored
        # embeddings (index, knn, training, human eval) would pay at start for nothing.
        from open_clip import get_model_preprocess_cfg

        preprocess_cfg = get_model_preprocess_cfg(model)
        # The config's own floats for the fingerprint (the float32 buffers below would change it).
        self.normalization = {key: [float(v) for v in preprocess_cfg[key]] for key in ("mean", "std")}
        self.image_size = _image_size(preprocess_cfg)
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(3, 1, 1), persistent=False)
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            self._dim = int(model.encode_image(probe).shape[-1])
        self._fingerprint_cache: tuple[tuple, str] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self._dim

    # ---- images ------------------------------------------------------------------------------

    def pixels(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], centre-cropped square and resized to S."""
        return self.resize(self.square_pixels(images))

    def square_pixels(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, side, side) in [0, 1], centre-cropped square at the stored size."""
        x = as_uint8_batch(images).to(self.device).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)
        height, width = x.shape[-2:]
        if height != width:
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            x = x[..., top:top + side, left:left + side]
        return x

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Square [0, 1] pixels -> the model's input side S (bicubic, antialiased when shrinking)."""
        if pixels.shape[-1] == self.image_size:
            return pixels
        return F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                             antialias=True, align_corners=False).clamp_(0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the model's input distribution (its mean/std)."""
        return (pixels - self.mean) / self.std

    def preprocess(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> model input (N, 3, S, S)."""
        return self.normalize(self.pixels(images))

    @torch.no_grad()
    def encode_images(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> L2-normalised float32 (N, dim)."""
        images = as_uint8_batch(images)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = self.preprocess(images[start:start + batch_size])
            out[start:start + len(batch)] = self.model.encode_image(batch, normalize=True).float().cpu().numpy()
        return out

    # ---- texts -------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(_string_list(texts)).to(self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """list of N strings -> L2-normalised float32 (N, dim)."""
        texts = _string_list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start:start + batch_size])
            out[start:start + len(tokens)] = self.model.encode_text(tokens, normalize=True).float().cpu().numpy()
        return out

    # ---- identity ----------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What, besides the weights, decides the embedding space (no file paths)."""
        return {"architecture": type(self.model).__name__, "dim": self.dim, "image_size": self.image_size,
                **self.normalization}

    @property
    def fingerprint(self) -> str:
        """sha256 over the identity JSON and every state-dict tensor (name, dtype, shape, bytes).

        Hashing ~100 MB of weights takes a noticeable fraction of a second, so the digest is cached
        and recomputed only when a tensor was replaced or modified in place (torch's version counter).
        """
        state = sorted(self.model.state_dict().items())
        key = tuple((name, t.data_ptr(), t._version) for name, t in state)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode())
            for name, tensor in state:
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
            self._fingerprint_cache = (key, digest.hexdigest())
        return self._fingerprint_cache[1]
