"""Params sections for the ``index`` and ``knn`` stages, and ``retrieval`` (inference-time settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between


class GpuUse(str, Enum):
    auto = "auto"      # use a GPU when faiss was built with GPU support and one is visible
    never = "never"
    always = "always"  # fail if no GPU can be used


class Scorer(str, Enum):
    auto = "auto"                        # laion_aesthetic when ``weights`` is set, else colourfulness
    colourfulness = "colourfulness"      # Hasler & Suesstrunk (2003) image statistic, needs no weights
    laion_aesthetic = "laion_aesthetic"  # linear head on CLIP image embeddings, needs ``weights``


@dataclass
class ScoreFilterConfig:
    """Restrict retrieval to images whose score quantile lies in [low, high); high=1 keeps the top."""

    low: float = field(default=0.0, metadata=between(0, 1))
    high: float = field(default=1.0, metadata=between(0, 1))


@dataclass
class RetrievalConfig:
    """Inference-time retrieval (``sample``, ``generate``, ``evaluate``): which part of the full index
    neighbours may come from. Subsets and the global score filter are a faiss id selector, so neither
    the index nor the model is rebuilt (paper Sec. 6.5 index-size ablation); the per-query score
    quantile picks among each query's neighbours (Fig. 7-8)."""

    # Deterministic nested subset of the index: the 10% subset lies inside the 30% one (same seed).
    index_fraction: float = field(default=1.0, metadata=between(0, 1, low_open=True))
    subset_seed: int = 0
    # Before the search: only images whose score lies in this quantile range of the whole index's
    # score column (the same images for every query).
    global_score_filter: ScoreFilterConfig = field(default_factory=ScoreFilterConfig)
    # After the search, per query (the paper's Sec. 4.2, Fig. 8): retrieve k * score_quantiles
    # neighbours, split them by score into score_quantiles equal groups, keep group score_quantile
    # (1 = lowest scores .. score_quantiles = highest). 0 = off.
    score_quantile: int = field(default=0, metadata=between(0, 100))
    score_quantiles: int = field(default=5, metadata=between(1, 100))
    # Where neighbours come from: a name in retrieval.backends.BACKENDS ('local': the index stage's FAISS
    # indexes, searched in-process; 'served': indexes exported with `knn-diffusion serve-export` and
    # answered by LAION's kNN service, `clip-retrieval back`, at served_url).
    backend: str = "local"
    served_url: str = "http://127.0.0.1:1234"
    served_timeout_s: float = field(default=30.0, metadata=between(0, 3600, low_open=True))  # per HTTP request


@dataclass
class IndexConfig:
    # 'auto' picks by collection size and budget (see index.choose_factory); or any faiss factory string.
    factory: str = "auto"
    bytes_per_vector: int = field(default=256, metadata=between(8, 8192))  # code bytes, ids excluded
    train_size: int = field(default=100_000, metadata=between(1_000))
    add_batch: int = field(default=65_536, metadata=between(1))
    target_recall: float = field(default=0.95, metadata=between(0, 1, high_open=False))
    tune_k: int = field(default=10, metadata=between(1, 1000))
    tune_queries: int = field(default=1_000, metadata=between(10))
    # Widest candidates-per-result ratio the tuner may use (it keeps the smallest that reaches target_recall):
    # re-scored against the index's memory-mapped float16 store (auto factory), else the stored embeddings; 1 = off.
    rerank_factor: int = field(default=40, metadata=between(1, 1000))
    use_gpu: GpuUse = GpuUse.auto
    seed: int = 0
    # >0: a sharded build (retrieval/sharded.py) of every index with an inverted file: train on a sample here, add
    # slices of the vectors on this many Dask worker processes (on the cluster at embed.dask_address when set),
    # merge their lists on disk (index.ivfdata, searched memory-mapped). Fast-scan PQ becomes plain PQ of the
    # same size and the re-rank reads the embedding store. A worker reads add_batch x d x 4 bytes at a time.
    shard_workers: int = field(default=0, metadata=between(0, 256))
    shard_memory_limit: str = "auto"  # per local worker: Dask's memory_limit ('auto': RAM / shard_workers, or '2GB')
    # Splits of the generator dataset that go into its index (keeps val/test images out of training
    # neighbours and out of retrieval during evaluation); other datasets are indexed whole.
    generator_splits: list[str] = field(default_factory=lambda: ["train"])
    # The per-image score column written beside each index (read at inference by retrieval.global_score_filter
    # and retrieval.score_quantile).
    scorer: Scorer = Scorer.auto
    scorer_weights: str = ""  # .safetensors / .npz / .pth holding ``weight`` (1, d) and ``bias`` (1,)


@dataclass
class KnnConfig:
    # Neighbours precomputed per training image; the k sweep reads the first k <= k_max columns.
    k_max: int = field(default=20, metadata=between(1, 1000))
    batch_size: int = field(default=1_024, metadata=between(1))
