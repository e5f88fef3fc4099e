"""DVC stage ``sample@<model>``: text -> kNN from an index -> guided sampling, for the default prompts.

``--model continuous|discrete`` picks the trained backbone (``models/<model>``) and its sampler settings
(``sample.<model>``); outputs go to ``outputs/samples/<model>/``. Generates the prompts once per index in
``sample.indexes``: the generator dataset's own index, and a swapped one (Noto while training on
OpenMoji) - the paper's out-of-distribution generation. Neighbours come
from the part of each index that ``retrieval`` selects (subset, score filter) - an inference-time
setting, so changing it reruns only this stage. The wiring is the library's (``generation``), shared
with ``knn-diffusion generate`` and ``evaluate``.
"""

from __future__ import annotations

import logging

import numpy as np

from knn_diffusion.backbones import load_generator
from knn_diffusion.config import Params
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.generation import generate, read_prompts
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.retrieval.backends import ServiceUnavailable, open_backend
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.tracking import model_run_id

log = logging.getLogger(__name__)


def sample_stage(params: Params, model: str) -> None:
    s = params.sample
    sampler = getattr(s, model)  # sample.continuous / sample.discrete
    with tracked(f"sample@{model}", params, tags={"model": model}) as run:
        report = {}
        prompts = read_prompts(s.prompts_file, within=paths.PROMPTS) if s.prompts_file else s.prompts
        generator = load_generator(paths.model_dir(model), backbone=model, **sampler.generator_options())
        generator.run_id = model_run_id(paths.model_dir(model), params.tracking.experiment,
                                         params.tracking.tracking_uri) or generator.run_id
        encoder = load_encoder(params.encoder, paths.ENCODER)
        backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
        with atomic_dir(paths.samples_dir(model)) as out:
            for index in s.indexes:
                if not backend.has(index):
                    log.warning("index '%s' not built (dataset not ingested?); skipping it", index)
                    continue
                neighbours = backend.open(index)
                records = generate(generator, out_dir=out / index, knn=neighbours.knn, prompts=prompts,
                                   encoder=encoder, guidance=sampler.guidance, steps=sampler.steps, seed=s.seed,
                                   index_sidecar=neighbours.sidecar)
                run.artifact(out / index / "grid.png", f"samples/{index}")
                report[index] = {"images": len(records), "mean_top1_score": float(np.mean(
                    [r["neighbour_scores"][0] for r in records if r["neighbour_scores"]] or [0.0]))}
                log.info("%s index: %d images -> %s", index, len(records), paths.samples_dir(model) / index)
        write_json(paths.sample_metrics(model), report)


def main(argv: list[str] | None = None) -> None:
    run_stage("sample", sample_stage, argv, user_errors=(FileNotFoundError, ValueError, ServiceUnavailable),
              per_model=True)


if __name__ == "__main__":
    main()
