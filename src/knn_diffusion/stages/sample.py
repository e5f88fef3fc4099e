"""DVC stage ``sample``: text -> kNN from an index -> guided sampling, for the default prompts.

Generates the prompts once per index in ``sample.indexes``: the generator dataset's own index, and a
swapped one (Noto while training on OpenMoji) - the paper's out-of-distribution generation. The same
wiring serves ``knn-diffusion generate``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.encoders.encoder import Encoder
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.io import atomic_dir, read_json, write_json
from knn_diffusion.models.unet import ContinuousDenoiser
from knn_diffusion.retrieval.config import ScoreFilterConfig
from knn_diffusion.retrieval.index import read_sidecar
from knn_diffusion.retrieval.scores import filter_active, quantile_selector
from knn_diffusion.retrieval.search import Searcher, vectors_by_id
from knn_diffusion.sampling import generate
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.training.checkpoint import load_denoiser

log = logging.getLogger(__name__)


def score_selector(index_dir: Path, score_filter: ScoreFilterConfig):
    """A faiss selector for the configured score-quantile range, or None when the filter is off."""
    if not filter_active(score_filter):
        return None
    column = np.load(index_dir / paths.SCORES_FILE)
    log.info("retrieval restricted to %s quantiles [%s, %s)", column["scorer"], score_filter.low, score_filter.high)
    return quantile_selector(column["scores"], column["ids"], score_filter.low, score_filter.high)


def neighbour_search(index: str | Path, fingerprint: str, dim: int, score_filter: ScoreFilterConfig | None = None):
    """A ``knn(query, k) -> (ids, scores, vectors)`` over an index directory or a dataset name.

    Neighbour embeddings are gathered from the embedding store of the dataset the index was built on;
    with an active ``score_filter`` only images in its score-quantile range are retrieved (still k).
    """
    index_dir = Path(index) if Path(index).is_dir() else paths.index_dir(str(index))
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index '{index}': neither a directory nor a dataset with an index under {paths.INDEX}")
    sidecar = read_sidecar(index_dir)
    dataset = sidecar.get("dataset", index_dir.name)
    store = EmbeddingStore.open(paths.embedding_dir(dataset))
    searcher = Searcher.open(index_dir, fingerprint, dim, get_vectors=vectors_by_id(store.ids, store.get))
    selector = score_selector(index_dir, score_filter) if score_filter is not None else None

    def knn(queries: np.ndarray, k: int):
        found = searcher.search(queries, k, selector=selector, return_vectors=True)
        return found.ids, found.scores, found.vectors

    return knn, sidecar


def load_models(params: Params, checkpoint: str | Path | None = None) -> tuple[ContinuousDenoiser, Encoder]:
    """The trained denoiser (EMA weights) and the encoder it was trained with, from the pipeline's outputs."""
    return load_denoiser(checkpoint or paths.CONTINUOUS_MODEL), load_encoder(params.encoder, paths.ENCODER)


def generate_images(params: Params, model: ContinuousDenoiser, encoder: Encoder, prompts: Sequence[str] | None,
                    out_dir: str | Path, *, index: str | None = None, image_embeddings: np.ndarray | None = None,
                    image_embedding_source: str = "", **overrides) -> list[dict]:
    """``generate`` wired to the pipeline's indexes and params; ``overrides``: k, guidance, steps, ..."""
    s = params.sample
    knn, sidecar = neighbour_search(index or params.data.generator_dataset, encoder.fingerprint, encoder.dim,
                                    params.index.score_filter)
    run_id = ""
    if paths.CONTINUOUS_METRICS.is_file():
        run_id = read_json(paths.CONTINUOUS_METRICS).get("mlflow_run_id", "")
    settings = {"guidance": s.guidance, "scheduler": s.scheduler, "steps": s.steps, "seed": s.seed,
                "k": None, **{k: v for k, v in overrides.items() if v is not None}}
    return generate(model, out_dir=out_dir, knn=knn, prompts=list(prompts) if prompts else None,
                    encoder=encoder if prompts else None, image_embeddings=image_embeddings,
                    model_run_id=run_id, index_fingerprint=sidecar.get("sha256", ""),
                    image_embedding_source=image_embedding_source, **settings)


def sample_stage(params: Params) -> None:
    s = params.sample
    with tracked("sample", params, "sample") as run:
        report = {}
        model, encoder = load_models(params)
        with atomic_dir(paths.SAMPLES) as out:
            for index in s.indexes:
                if not paths.index_dir(index).is_dir():
                    log.warning("index '%s' not built (dataset not ingested?); skipping it", index)
                    continue
                records = generate_images(params, model, encoder, s.prompts, out / index, index=index)
                run.artifact(out / index / "grid.png", f"samples/{index}")
                report[index] = {"images": len(records), "mean_top1_score": float(np.mean(
                    [r["neighbour_scores"][0] for r in records if r["neighbour_scores"]] or [0.0]))}
                log.info("%s index: %d images -> %s", index, len(records), paths.SAMPLES / index)
        write_json(paths.SAMPLE_METRICS, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("sample", sample_stage, argv)


if __name__ == "__main__":
    main()
