"""Prompt -> kNN condition -> images on disk, for any trained backbone (the wiring of ``sample``,
``generate`` and ``evaluate``).

A *generator* is whatever turns (B, 1+K, d) conditions into images; each backbone wraps its model in
one (``models/<backbone>/generator.py``) and :func:`knn_diffusion.backbones.load_generator`
picks the wrapper from the checkpoint's ``backbone`` field, so this module never branches on the
backbone. The neighbours come from the retrieval backend
(:func:`knn_diffusion.retrieval.backends.open_backend`) with the inference-time retrieval settings
(index subset, score filter, score quantile).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from knn_diffusion.images import image_grid, save_png
from knn_diffusion.io import write_json
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant
from knn_diffusion.retrieval.inference import NeighbourSearch


class Generator(Protocol):
    """A trained backbone ready to sample; ``settings`` go into every image's sidecar."""

    conditioning: ConditioningConfig
    run_id: str  # the MLflow run that trained it ("" when the checkpoint does not say)
    backbone: str
    settings: dict[str, Any]

    def sample(self, cond: np.ndarray, *, guidance: float, steps: int, seeds: Sequence[int]) -> np.ndarray:
        """cond (B, 1+K, d) float32 -> uint8 images (B, H, W, 3); image i from noise seeded seeds[i]."""


class TextEncoder(Protocol):
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """(N, d) float32 embeddings in the joint space."""




def read_prompts(path: str | os.PathLike, within: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped).

    ``within``: the folder the file must lie in (the one a DVC stage declares as its dep).
    """
    path = Path(path)
    if within is not None and not path.resolve().is_relative_to(Path(within).resolve()):
        raise ValueError(f"prompts file {path}: expected a file under {within}/ (the folder the stage declares "
                         "as its input in dvc.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path}: not found")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path}: no prompts (expected one per line)")
    return prompts


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def generate(generator: Generator, *, out_dir: str | os.PathLike, knn: NeighbourSearch,
             prompts: Sequence[str] | None = None, encoder: TextEncoder | None = None,
             image_embeddings: np.ndarray | None = None, k: int | None = None, guidance: float = 3.0,
             steps: int = 25, seed: int = 0, batch_size: int = 16, index_sidecar: dict | None = None,
             image_embedding_source: str = "") -> list[dict]:
    """Generate one image per prompt (or per image embedding) and write PNGs, sidecars and a grid.

    Writes ``<i>-<slug>.png`` + ``<i>-<slug>.json`` (prompt, seed, neighbour ids and scores, model
    run id, index fingerprint and retrieval settings, sampler settings) and ``grid.png`` into
    ``out_dir``; returns the sidecars. ``k`` defaults to the k the model was trained with; a
    variant that does not use neighbours (``no_knn``) retrieves nothing.
    """
    if (prompts is None) == (image_embeddings is None):
        raise ValueError("give either prompts (with an encoder) or image_embeddings, not both")
    if prompts is not None:
        if encoder is None:
            raise ValueError("prompts need an encoder with encode_texts()")
        queries = np.asarray(encoder.encode_texts(list(prompts)), dtype=np.float32)  # (N, d)
    else:
        queries = np.atleast_2d(np.asarray(image_embeddings, dtype=np.float32))
    trained = generator.conditioning
    if queries.shape[1] != trained.embed_dim:
        raise ValueError(f"query embeddings have d={queries.shape[1]}, the model was trained on d={trained.embed_dim}")
    k = ConditioningVariant(trained.variant).neighbours(trained.k if k is None else k)
    count = len(queries)
    if k > 0:
        ids, scores, neighbours = knn(queries, k)  # (N, k), (N, k), (N, k, d)
        cond = np.concatenate([queries[:, None], np.asarray(neighbours, dtype=np.float32)], axis=1)  # (N, 1+k, d)
    else:
        ids, scores = np.zeros((count, 0), np.int64), np.zeros((count, 0), np.float32)
        cond = queries[:, None]  # (N, 1, d)
    images = np.concatenate([
        generator.sample(cond[start:start + batch_size], guidance=guidance, steps=steps,
                         seeds=[seed + i for i in range(start, min(start + batch_size, count))])
        for start in range(0, count, batch_size)])
    index_sidecar = index_sidecar or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        prompt = prompts[i] if prompts is not None else None
        stem = f"{i:04d}-{_slug(prompt or 'image-embedding')}"
        record = {
            "prompt": prompt,
            "image_embedding_from": None if prompts is not None else image_embedding_source,
            "image_embedding_row": None if prompts is not None else i,
            "seed": seed + i,
            "k": k,
            "neighbour_ids": np.asarray(ids[i]).tolist(),
            "neighbour_scores": [float(s) for s in np.asarray(scores[i])],
            "guidance": guidance,
            "steps": steps,
            **generator.settings,
            "backbone": generator.backbone,
            "variant": ConditioningVariant(trained.variant).value,
            "model_run_id": generator.run_id,
            "index_fingerprint": index_sidecar.get("sha256", ""),
            "index_fraction": index_sidecar.get("index_fraction", 1.0),
            "subset_seed": index_sidecar.get("subset_seed", 0),
            "global_score_filter": index_sidecar.get("global_score_filter", [0.0, 1.0]),
            "score_quantile": index_sidecar.get("score_quantile", [0, 0]),
            "image": f"{stem}.png",
        }
        save_png(out_dir / f"{stem}.png", images[i])
        write_json(out_dir / f"{stem}.json", record)
        records.append(record)
    save_png(out_dir / "grid.png", image_grid(images))
    return records
