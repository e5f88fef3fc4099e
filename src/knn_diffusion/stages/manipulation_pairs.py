"""DVC stage ``manipulation_pairs``: the training pairs of mask-free manipulation (paper Sec. 3.1).

For every training image (train split only: the ``knn`` table's rows, behind the training stages'
leakage guard): a seeded random box M, the first nearest neighbour from the ``knn`` table aligned with
OpenCV's ECC, I_manip = I * (1 - M) + align(nn) * M, the embedding f_img(I * M) and that embedding's
k nearest training images (exact search, I itself excluded). Unalignable neighbours are skipped and
counted. Out: ``data/manipulation/<dataset>.npz`` + ``.json``; ECC convergence rate and alignment
residuals in ``metrics/manipulation_pairs.json``; a preview grid (original | neighbour | aligned |
manipulated | mask) in MLflow.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.images import image_grid
from knn_diffusion.io import atomic_path, write_json
from knn_diffusion.manipulation.pairs import REGION_VIEWS, PairSet, apply_warp, box_mask, build_pairs
from knn_diffusion.retrieval.search import exact_neighbours, without_ids
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.stages.train_common import load_training_inputs

log = logging.getLogger(__name__)


def preview_grid(images, pairs: PairSet, count: int) -> np.ndarray:
    """``count`` rows of (original | neighbour | aligned | manipulated | mask), spread over the pairs."""
    tiles = []
    for i in np.unique(np.linspace(0, len(pairs.rows) - 1, min(count, len(pairs.rows))).astype(int)):
        original, neighbour = images[pairs.rows[i]], images[pairs.neighbours[i]]
        mask = np.repeat(box_mask(original.shape[0], pairs.boxes[i])[..., None], 3, axis=2).astype(np.uint8) * 255
        tiles += [original, neighbour, apply_warp(neighbour, pairs.warps[i]), pairs.manipulated[i], mask]
    return image_grid(np.stack(tiles), columns=5)


def pairs_stage(params: Params) -> None:
    cfg = params.manipulation_pairs
    name = params.data.generator_dataset
    inputs = load_training_inputs(name, "manipulation_pairs", 1)  # train split only (leakage guard)
    first = np.load(inputs.neighbours_file)["ids"][:, 0]  # never the image itself nor a duplicate (knn stage)
    started = time.perf_counter()
    with tracked("manipulation_pairs", params) as run:
        pairs = build_pairs(lambda row: inputs.images[int(row)], inputs.train_rows, first, cfg)
        if not pairs.rows:
            raise ValueError(f"no training pair: ECC aligned none of {len(first)} neighbours "
                             f"({pairs.failures}); lower manipulation_pairs.min_correlation or change motion")
        encoder = load_encoder(params.encoder, paths.ENCODER)
        view = REGION_VIEWS[cfg.region_view]
        regions = np.stack([view(inputs.images[row], box, params.data.background)
                            for row, box in zip(pairs.rows, pairs.boxes)])
        region_embeddings = encoder.encode_images(regions)  # (P, d): f_img(I * M)
        if encoder.fingerprint != inputs.store.fingerprint:
            raise ValueError(f"encoder fingerprint {encoder.fingerprint[:16]} differs from the embeddings' "
                             f"{inputs.store.fingerprint[:16]} in {paths.embedding_dir(name)}; rerun embed")
        rows = np.asarray(pairs.rows, dtype=np.int64)
        region_neighbours = np.zeros((len(rows), 0), np.int64)
        if cfg.k:
            train_vectors = inputs.store.get(inputs.self_positions)
            _, found = exact_neighbours(train_vectors, inputs.train_rows, region_embeddings, cfg.k + 1)
            region_neighbours = without_ids(found, rows, cfg.k)  # (P, k): I itself excluded
        out = paths.manipulation_pairs_file(name)
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, rows=rows, neighbours=np.asarray(pairs.neighbours, np.int64),
                     boxes=np.asarray(pairs.boxes, np.int64), warps=np.stack(pairs.warps),
                     correlations=np.asarray(pairs.correlations, np.float32), manipulated=np.stack(pairs.manipulated),
                     region_embeddings=region_embeddings.astype(np.float32), region_neighbours=region_neighbours)
        write_json(out.with_suffix(".json"), {"dataset": name, "encoder_fingerprint": encoder.fingerprint,
                                              "region_view": cfg.region_view.value, "motion": cfg.motion.value,
                                              "k": cfg.k})
        images = len(first)
        report = {"images": images, "pairs": len(rows), "skipped": pairs.skipped,
                  "not_converged": pairs.failures.get("not_converged", 0),
                  "low_correlation": pairs.failures.get("low_correlation", 0),
                  "ecc_convergence_rate": round(len(rows) / images, 6),
                  "correlation_mean": round(float(np.mean(pairs.correlations)), 6),
                  "residual_before_mean": round(float(np.mean(pairs.residual_before)), 6),
                  "residual_after_mean": round(float(np.mean(pairs.residual_after)), 6),
                  "mask_fraction_mean": round(float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in pairs.boxes])
                                                    / inputs.images[int(rows[0])].shape[0] ** 2), 6),
                  "seconds": round(time.perf_counter() - started, 1)}
        run.metrics(report)
        run.image(preview_grid(inputs.images, pairs, cfg.preview),
                  "manipulation_pairs/preview_original_neighbour_aligned_manipulated_mask.png")
        write_json(paths.MANIPULATION_PAIRS_METRICS, report)
        log.info("%d pairs from %d training images (ECC converged on %.1f%%; skipped %s); residual |I - nn| "
                 "%.4f -> %.4f after alignment", len(rows), images, 100 * report["ecc_convergence_rate"],
                 pairs.failures, report["residual_before_mean"], report["residual_after_mean"])


def main(argv: list[str] | None = None) -> None:
    run_stage("manipulation_pairs", pairs_stage, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    main()
