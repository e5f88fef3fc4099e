"""Training pairs (x0, y) for the generators, read from memory-mapped stores.

x0 is an image in [-1, 1] (continuous backbone) or its VQ token map (discrete backbone) and
y = (f_img(x0), knn_img(x0, k)): the image's own embedding followed by the embeddings of its k
precomputed neighbours (the ``knn`` stage's table, self excluded). Captions
are never read.

The order of samples is a pure function of (seed, step) (:class:`StepBatchSampler`), so a resumed
run sees exactly the batches an uninterrupted one would, and DDP ranks split each global batch.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class EmbeddingSource(Protocol):
    def get(self, positions: np.ndarray) -> np.ndarray:
        """float32 (n, d) embeddings at ``positions`` of the index collection."""


class ConditionedImages(Dataset):
    """Item i -> (image (3, H, W) float32 in [-1, 1], condition (1+k, d) float32)."""

    def __init__(self, images: Sequence, embeddings: EmbeddingSource, self_rows: np.ndarray,
                 neighbours: np.ndarray, k: int):
        self_rows = np.asarray(self_rows, dtype=np.int64)
        if len(self_rows) != len(images):
            raise ValueError(f"self_rows has {len(self_rows)} entries for {len(images)} images")
        if neighbours.ndim != 2 or len(neighbours) != len(images):
            raise ValueError(f"neighbour table has shape {neighbours.shape}, expected ({len(images)}, k_max)")
        if k > neighbours.shape[1]:
            raise ValueError(f"k={k} neighbours requested but the neighbour table holds {neighbours.shape[1]}")
        self.images = images
        self.embeddings = embeddings
        self.self_rows = self_rows
        self.neighbours = neighbours
        self.k = k

    def __len__(self) -> int:
        return len(self.self_rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, conds = self.__getitems__([index])
        return images[0], conds[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one read of each store (DataLoader calls this instead of __getitem__)."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.concatenate([self.self_rows[indices, None],
                               np.asarray(self.neighbours[indices, :self.k], dtype=np.int64)], axis=1)  # (B, 1+k)
        flat = np.asarray(self.embeddings.get(rows.reshape(-1)), dtype=np.float32)  # (B*(1+k), d)
        cond = torch.from_numpy(flat.reshape(len(indices), 1 + self.k, -1))  # (B, 1+k, d)
        return self.targets(indices), cond

    def targets(self, indices: np.ndarray) -> torch.Tensor:
        """What the generator learns to produce for items ``indices``: images (B, 3, H, W) in [-1, 1]."""
        pixels = np.asarray(self.images[indices])  # (B, H, W, 3) uint8
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (B, 3, H, W)


class ConditionedTokens(ConditionedImages):
    """Item i -> (VQ token map flattened (h*w,) int64, condition (1+k, d) float32); ``images`` holds
    the token maps (N, h, w)."""

    def targets(self, indices: np.ndarray) -> torch.Tensor:
        maps = np.asarray(self.images[indices])  # (B, h, w)
        return torch.from_numpy(maps.reshape(len(indices), -1).astype(np.int64))  # (B, h*w)


def _already_batched(batch):
    return batch


class StepBatchSampler:
    """Index lists for steps ``start_step .. stop_step-1`` of one rank, as a function of (seed, step).

    The global batch of step s is positions [s*B, (s+1)*B) of an endless stream made of one
    permutation per epoch (seeded by (seed, epoch)); rank r takes every world-th element of it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {world_size} DDP ranks")
        if num_items < 1:
            raise ValueError("no training images")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._order

    def global_batch(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        batch = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.num_items):
            in_epoch = positions // self.num_items == epoch
            batch[in_epoch] = self._permutation(int(epoch))[positions[in_epoch] % self.num_items]
        return batch

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.stop_step):
            yield self.global_batch(step)[self.rank::self.world_size].tolist()


def make_loader(dataset: ConditionedImages, sampler: StepBatchSampler, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Batches (images (b, 3, H, W), cond (b, 1+k, d)) in sampler order; b = batch_size / world_size."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_already_batched,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if num_workers else None)
