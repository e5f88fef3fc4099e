"""Offline alignment: train the aligned model's image tower against the locked MiniLM text tower.

CLIP's contrastive objective (open_clip ``ClipLoss``) on (image, "an emoji of {name}") pairs. The
text transformer is locked, so its pooled features are computed once per (name, template); each step
only runs the image tower, the trainable text projection (``text.proj``, left unlocked by
``lock_text_tower``) and the logit scale. Checkpoints hold optimizer, scheduler and RNG state, so a
killed run resumes to exactly the weights an uninterrupted run would reach.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.hf_model import HFTextEncoder
from tqdm.auto import tqdm

from knn_diffusion.config_fields import to_plain
from knn_diffusion.encoders.aligned import build_aligned, save_aligned
from knn_diffusion.encoders.config import EncoderConfig
from knn_diffusion.encoders.encoder import Encoder, as_uint8_batch
from knn_diffusion.encoders.towers import freeze_early_stages
from knn_diffusion.io import atomic_path

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp on the learned temperature


def prompts(name: str, templates: Sequence[str]) -> list[str]:
    return [template.format(name=name) for template in templates]


@torch.no_grad()
def pooled_text_features(encoder: Encoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """MiniLM mean-pooled features before the trainable projection: (len(texts), 384)."""
    text = encoder.model.text
    if not isinstance(text, HFTextEncoder):
        raise TypeError(f"alignment needs the aligned model's HF text tower, got {type(text).__name__}")
    tokens = encoder.tokenize(texts)                                                          # (T, L)
    mask = (tokens != text.config.pad_token_id).long()
    lengths = mask.sum(1)
    out = torch.empty(len(texts), text.transformer.config.hidden_size)
    # Similar lengths together, all-padding columns dropped: masked positions change nothing.
    for chunk in torch.argsort(lengths, stable=True).split(batch_size):
        used = int(lengths[chunk].max())
        chunk_tokens, chunk_mask = tokens[chunk, :used], mask[chunk, :used]
        out[chunk] = text.pooler(text.transformer(input_ids=chunk_tokens, attention_mask=chunk_mask), chunk_mask)
    return out


def rows_without_names(names: Sequence[str | None], held_out: Iterable[str | None]) -> np.ndarray:
    """Positions with a name that is not held out: keeps the recall evaluation's names unseen in training."""
    held_out = {n.strip() for n in held_out if isinstance(n, str)}
    return np.array([i for i, n in enumerate(names) if isinstance(n, str) and n.strip()
                     and n.strip() not in held_out], dtype=np.int64)


def augment(pixels: torch.Tensor, generator: torch.Generator, max_shift: float, min_scale: float) -> torch.Tensor:
    """Random zoom-out and shift that keep an emoji's meaning (no flips: arrows; no colour: "red")."""
    n = len(pixels)
    scale = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)                  # (n,)
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * 2 * max_shift                   # (n, 2) in [-1, 1] units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -shift / scale[:, None]                                     # input = (out - shift) / scale
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)                     # (n, S, S, 2)
    # Border padding repeats the edge pixels: the white background the glyphs sit on.
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


OUTLINE_THRESHOLDS = (0.15, 0.4)  # the colour step (max over RGB) that gets a line, drawn per image from this range
OUTLINE_DARKNESS = 0.15           # a line pixel keeps this fraction of its colour: a near-black stroke


def draw_outlines(pixels: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Darken the pixel before every colour boundary (right and down) in a random ``prob`` of the images.

    OpenMoji, the generator's dataset, draws a black stroke around every shape and colour region; the
    aligned styles mostly do not, and recall on OpenMoji fell most from that style gap (docs/benchmarks.md).
    One-sided differences give lines one pixel wide, as OpenMoji's strokes are at 32 px.
    """
    n = len(pixels)
    step_x = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1, keepdim=True)          # (n, 1, S, S-1)
    step_y = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1, keepdim=True)          # (n, 1, S-1, S)
    step = torch.maximum(F.pad(step_x, (0, 1)), F.pad(step_y, (0, 0, 0, 1)))                 # (n, 1, S, S)
    low, high = OUTLINE_THRESHOLDS
    threshold = low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)
    chosen = (torch.rand(n, generator=generator) < prob).view(n, 1, 1, 1)
    return torch.where((step > threshold) & chosen, pixels * OUTLINE_DARKNESS, pixels)


NEIGHBOUR_POOL = 8  # a group's other names are drawn from its anchor name's this many nearest names


def nearest_names(text_features: torch.Tensor, count: int) -> torch.Tensor:
    """(U, count) indices of each name's most similar other names, by cosine of its template-mean feature."""
    features = F.normalize(text_features.mean(1), dim=-1)                                   # (U, 384)
    similarity = features @ features.T                                                        # (U, U)
    similarity.fill_diagonal_(-math.inf)
    return similarity.topk(min(count, len(features) - 1), dim=1).indices


class NeighbourBatches:
    """Batches of ``group``-sized clusters: a random anchor image, then one random image of each of
    ``group - 1`` names drawn from the anchor name's nearest names. With ``group`` 1, uniform batches."""

    def __init__(self, name_index: torch.Tensor, text_features: torch.Tensor, group: int):
        self.name_index, self.group = name_index, group
        if group == 1:
            return
        self.neighbours = nearest_names(text_features, max(NEIGHBOUR_POOL, group - 1))        # (U, M)
        counts = torch.bincount(name_index, minlength=len(text_features))                    # (U,)
        order = torch.argsort(name_index, stable=True)
        self.first = torch.cumsum(counts, 0) - counts                                        # (U,) into order
        self.order, self.counts = order, counts

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        n = len(self.name_index)
        if self.group == 1:
            return torch.randperm(n, generator=generator)[:batch_size]                        # (B,)
        anchors = torch.randperm(n, generator=generator)[:math.ceil(batch_size / self.group)]  # (A,)
        pool = self.neighbours[self.name_index[anchors]]                                      # (A, M)
        pick = torch.rand(pool.shape, generator=generator).argsort(1)[:, :self.group - 1]     # (A, g-1) distinct
        names = pool.gather(1, pick)                                                          # (A, g-1)
        offset = (torch.rand(names.shape, generator=generator) * self.counts[names]).long()
        members = self.order[self.first[names] + offset]                                      # (A, g-1) rows
        return torch.cat([anchors[:, None], members], 1).flatten()[:batch_size]               # (B,)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _run_key(cfg: EncoderConfig, images: np.ndarray, names: Sequence[str]) -> str:
    """Identifies the training run, so a checkpoint from other data or settings is never resumed."""
    digest = hashlib.sha256(json.dumps(to_plain(cfg), sort_keys=True).encode())
    digest.update(json.dumps(list(names)).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def _changing_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters and the buffers (a conv tower's BatchNorm statistics)."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(model.named_buffers())
    return tensors


def _save_state(path: Path, step: int, run_key: str, encoder: Encoder, optimizer, scheduler,
                generator: torch.Generator) -> None:
    tensors = {n: t.detach().clone() for n, t in _changing_tensors(encoder.model).items()}
    with atomic_path(path) as tmp:
        torch.save({"step": step, "run_key": run_key, "tensors": tensors,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state()}, tmp)


def _load_state(path: Path, run_key: str, steps: int, encoder: Encoder, optimizer, scheduler,
                generator: torch.Generator) -> int:
    """Restore the checkpoint of a killed run of the same data and settings; returns the step to continue
    from (0 when there is none, or that run finished: calling a finished run again means training again)."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("run_key") != run_key:
        log.warning("%s: checkpoint is from other data or settings; starting from step 0", path)
        return 0
    if int(state["step"]) >= steps:
        log.info("%s: that run finished; training again from step 0", path)
        return 0
    tensors = _changing_tensors(encoder.model)
    with torch.no_grad():
        for name, value in state["tensors"].items():
            tensors[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    return int(state["step"])


def train_alignment(images: Any, names: Sequence[str], cfg: EncoderConfig, out_dir: str | os.PathLike,
                    on_log: Callable[[int, dict], None] | None = None, resume: bool = True,
                    state_dir: str | os.PathLike | None = None) -> Encoder:
    """Train the aligned model on paired (image, name) data; save it to ``out_dir`` and return it.

    ``images``: uint8 (N, H, W, 3); ``names``: N captions (an emoji's name, no template).
    ``state_dir`` holds the resumable checkpoint (default ``out_dir``); put it outside a DVC output
    to survive ``dvc repro`` deleting outputs before a rerun.
    """
    a = cfg.alignment
    images = as_uint8_batch(images).numpy()
    names = list(names)
    if len(names) != len(images):
        raise ValueError(f"train_alignment: {len(images)} images but {len(names)} names")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError("train_alignment: every image needs a non-empty name")
    if len(images) < 2:
        raise ValueError("train_alignment: contrastive training needs at least 2 pairs")
    state_path = Path(state_dir or out_dir) / STATE_FILE
    run_key = _run_key(cfg, images, names)

    encoder = build_aligned(cfg.vision, seed=a.seed)
    model = encoder.model
    frozen = freeze_early_stages(model.visual, cfg.vision.tower, a.frozen_stages)
    # Augmented at the stored size, then resized to the tower's: a 32 px glyph's outline is then as wide as
    # OpenMoji's own strokes at 32 px, whatever the tower's input size (measured: docs/benchmarks.md).
    pixels = encoder.square_pixels(images)                                                   # (N, 3, H, H)
    unique_names = sorted(set(names))
    position = {name: i for i, name in enumerate(unique_names)}
    name_index = torch.tensor([position[n] for n in names])                                   # (N,) into unique_names
    texts = [p for n in unique_names for p in prompts(n, a.templates)]
    text_features = pooled_text_features(encoder, texts).view(len(unique_names), len(a.templates), -1)  # (U, T, 384)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in trainable if not (p.ndim < 2 or "logit_scale" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(a.warmup, a.steps))
    generator = torch.Generator().manual_seed(a.seed)
    start = _load_state(state_path, run_key, a.steps, encoder, optimizer, scheduler, generator) if resume else 0

    loss_fn = ClipLoss()
    batch_size = min(a.batch_size, len(images))
    batches = NeighbourBatches(name_index, text_features, a.neighbour_group)
    model.visual.train()
    for module in frozen:
        module.eval()
    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc="align", unit="step"):
        rows = batches(batch_size, generator)                                                 # (B,)
        template = torch.randint(len(a.templates), (batch_size,), generator=generator)        # (B,)
        x = draw_outlines(augment(pixels[rows], generator, a.max_shift, a.min_scale), generator, a.outline_prob)
        x = encoder.resize(x)                                                                 # (B, 3, S, S)
        image_features = model.encode_image(encoder.normalize(x), normalize=True)             # (B, d)
        text_features_b = F.normalize(model.text.proj(text_features[name_index[rows], template]), dim=-1)
        loss = loss_fn(image_features, text_features_b, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if on_log is not None:
            on_log(step + 1, {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                              "logit_scale": model.logit_scale.detach().exp().item()})
        if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
            _save_state(state_path, step + 1, run_key, encoder, optimizer, scheduler, generator)
    model.eval()
    save_aligned(encoder, out_dir)
    return encoder


def encode_prompts(encoder: Encoder, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One text embedding per name: the normalised mean over templates (CLIP's prompt ensembling)."""
    texts = [p for n in names for p in prompts(n, templates)]
    per_prompt = encoder.encode_texts(texts).reshape(len(names), len(templates), -1)      # (Q, T, d)
    mean = per_prompt.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def text_to_image_recall(encoder: Encoder, images: Any, names: Sequence[str | None], ks: Sequence[int] = (1, 5, 10),
                         templates: Sequence[str] = ("an emoji of {name}",)) -> dict[str, float]:
    """Zero-shot text->image retrieval: each distinct name queries the whole image set.

    A query hits at k when any image carrying that name is among the k most similar images (names may
    repeat: several glyphs can share one). ``recall@k`` is the mean hit rate over distinct names;
    ``chance@k`` is the same expectation under a random ranking, 1 - C(N-m, k) / C(N, k) for a name
    with m images, averaged over names. Images without a name (None/empty) stay in the gallery as
    distractors but are never queried. Also reports the median rank of the first relevant image.
    """
    image_embeddings = encoder.encode_images(images)                                       # (N, d)
    labels = [n.strip() if isinstance(n, str) else "" for n in names]
    if len(labels) != len(image_embeddings):
        raise ValueError(f"text_to_image_recall: {len(image_embeddings)} images but {len(labels)} names")
    queries = sorted({n for n in labels if n})
    if not queries:
        raise ValueError("text_to_image_recall: no named images to query")
    relevant = np.array([[label == q for label in labels] for q in queries])              # (Q, N) bool
    similarity = encode_prompts(encoder, queries, templates) @ image_embeddings.T          # (Q, N)
    best_relevant = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)     # (Q, 1)
    first_rank = (similarity > best_relevant).sum(axis=1) + 1                             # (Q,) 1-based
    total, per_query = len(labels), relevant.sum(axis=1)
    result: dict[str, float] = {"queries": len(queries), "images": total,
                                "median_rank": float(np.median(first_rank))}
    for k in ks:
        miss = np.ones(len(queries))
        for i in range(min(k, total)):                                                     # P(no relevant in top k)
            miss *= np.clip((total - per_query - i) / (total - i), 0, None)
        result[f"recall@{k}"] = float((first_rank <= k).mean())
        result[f"chance@{k}"] = float((1 - miss).mean())
    return result
