"""Indexes in the layout LAION's kNN service serves (``clip-retrieval back``), for ``retrieval.backend=served``.

``clip-retrieval back --indices_paths <out>/indices.json`` answers ``/knn-service`` with the row
positions of a faiss index and the metadata row at each position. :func:`export_index` writes, per index:

* ``<out>/<name>/image.index``: the local index without its id map, with its tuned search parameters
  (nprobe, efSearch, re-rank factor) stored in the file, so the service searches as the local backend does;
* ``<out>/<name>/metadata/0.parquet``: one row per position: ``content_id`` (the image id the local index
  returns), ``embedding`` (its float32 vector, base64), ``score`` (its score-column value, when the index
  has one), ``png`` (its image, base64, when the ingested images are at hand) and ``facts`` (the index's
  sidecar as JSON: encoder fingerprint, sha256, ...).

So every answer of the service carries content ids with their vectors and the encoder fingerprint:
positions never leave it, and the client (``retrieval/served.py``) checks the fingerprint of each answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.io import atomic_dir, read_json, write_json
from knn_diffusion.retrieval.index import load_index, refine_of
from knn_diffusion.retrieval.inference import read_score_column
from knn_diffusion.retrieval.scores import score_lookup
from knn_diffusion.retrieval.served import encode_png, encode_vector

INDICES_FILE = "indices.json"   # clip-retrieval back --indices_paths
SERVED_INDEX_FILE = "image.index"  # its name for an index of image embeddings
COLUMNS = ["content_id", "embedding", "score", "png", "facts"]
# The service's per-index options: nothing it would download at start-up but the CLIP model it is given.
SERVICE_OPTIONS = {"enable_mclip_option": False, "provide_aesthetic_embeddings": False, "provide_safety_model": False,
                   "provide_violence_detector": False, "use_jit": False, "enable_hdf5": False, "use_arrow": False,
                   "enable_faiss_memory_mapping": False, "reorder_metadata_by_ivf_index": False}
# What clip-retrieval back embeds text and images it is sent with (knn-diffusion sends embeddings only).
DEFAULT_SERVICE_CLIP = "open_clip:ViT-B-32/laion2b_s34b_b79k"


def by_position(index: faiss.Index, sidecar: dict[str, Any], where: Path) -> tuple[faiss.Index, np.ndarray]:
    """(the index inside ``index``'s id map, searching with the tuned parameters of ``sidecar``; the content
    id of each of its positions)."""
    top = faiss.downcast_index(index)
    if not isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise ValueError(f"{where}: a {type(top).__name__} stores its ids in its lists; the service answers by "
                         "position, so export an index with an id map (index.factory=auto, Flat or a Refine index)")
    ids = faiss.vector_to_array(top.id_map).astype(np.int64)
    inner = faiss.downcast_index(top.index)
    refine = refine_of(index)
    params = sidecar.get("search_params") or {}
    if params:
        faiss.ParameterSpace().set_index_parameters(refine.base_index if refine is not None else inner,
                                                    ",".join(f"{key}={value}" for key, value in params.items()))
    if refine is not None:
        refine.k_factor = float(sidecar.get("rerank_factor", 1))
    return inner, ids


def metadata_table(ids: np.ndarray, sidecar: dict[str, Any], index_dir: Path, embed_dir: Path,
                   ingest_dir: Path) -> pd.DataFrame:
    """One row per position of the served index (the :data:`COLUMNS`)."""
    store = EmbeddingStore.open(embed_dir)
    vectors = store.get(store.positions_of(ids))
    column = read_score_column(index_dir)
    has_images = (ingest_dir / "manifest.parquet").is_file()
    facts = json.dumps({**sidecar, "scores": column is not None, "images": has_images}, sort_keys=True)
    table = {"content_id": ids, "embedding": [encode_vector(v) for v in vectors], "facts": facts}
    if column is not None:
        table["score"] = score_lookup(*column)(ids).astype(np.float64)
    if has_images:
        images = ImageStore.open(ingest_dir)
        table["png"] = [encode_png(images[int(i)]) for i in ids]
    return pd.DataFrame(table)


def export_index(index_dir: str | os.PathLike, embed_root: str | os.PathLike, ingest_root: str | os.PathLike,
                 out_dir: str | os.PathLike, name: str | None = None,
                 service_clip: str = DEFAULT_SERVICE_CLIP) -> Path:
    """Write the index at ``index_dir`` (its embeddings under ``embed_root``, images under ``ingest_root``,
    both by its dataset) as ``<out_dir>/<name>`` and add it to ``<out_dir>/indices.json``; returns that file.

    ``name`` (default: the index's dataset) is what ``retrieval.backend=served`` asks the service for.
    ``service_clip``: the all_clip name of the CLIP the service loads at start-up, e.g.
    ``open_clip:ViT-B-32//abs/path/weights.pt`` for a local file.
    """
    index_dir, out_dir = Path(index_dir), Path(out_dir).resolve()
    index, sidecar = load_index(index_dir, mmap=False)
    dataset = sidecar.get("dataset", index_dir.name)
    name = name or dataset
    served, ids = by_position(index, sidecar, index_dir)
    table = metadata_table(ids, {**sidecar, "dataset": dataset}, index_dir, Path(embed_root) / dataset,
                           Path(ingest_root) / dataset)
    with atomic_dir(out_dir / name) as tmp:
        faiss.write_index(served, str(tmp / SERVED_INDEX_FILE))
        (tmp / "metadata").mkdir()
        table.to_parquet(tmp / "metadata" / "0.parquet", index=False)
    indices_file = out_dir / INDICES_FILE
    indices = read_json(indices_file) if indices_file.is_file() else {}
    indices[name] = {"indice_folder": str(out_dir / name), "clip_model": service_clip,
                     "columns_to_return": COLUMNS, **SERVICE_OPTIONS}
    write_json(indices_file, indices)
    return indices_file
