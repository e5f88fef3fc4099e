"""DVC stage ``evaluate_manipulation``: edits of held-out images with held-out prompts, against two baselines.

Held-out test-split images x the edit prompts of ``evaluate_manipulation.prompts_file`` (under
``prompts/``; never seen in training, which reads no text). Three systems on the same items, conditions
(f_txt(prompt) + its k neighbours) and seeds:

* ``edit``: the manipulation model with the image in its image slot;
* ``text_to_image``: the text-to-image model it was fine-tuned from, same prompt, no image (matches the
  text, loses the identity);
* ``input``: the unedited input (keeps the identity, matches nothing new).

Text correspondence is the judge's CLIP-score gain over the input; identity is SSIM/PSNR against the
input outside the region that changed (``manipulation/evaluation.py``). The judge is the evaluation
encoder of ``evaluate`` (``evaluate.judge``: the judge stage's model by default), named by fingerprint.
Each system is an MLflow child run. Outs: generate-style folders of (input | output) images per
system (what ``human_eval`` pairs), ``edits.csv``, ``grid.png``, ``evaluate_manipulation.json``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import numpy as np

from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.evaluation.grid import draw
from knn_diffusion.evaluation.stats import mean_interval, paired_difference_interval
from knn_diffusion.generation import read_prompts
from knn_diffusion.images import image_grid, save_png
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.manipulation.editing import edit_images, text_conditions
from knn_diffusion.manipulation.evaluation import changed_region, identity_scores, summarise, text_scores
from knn_diffusion.manipulation.model import load_manipulation_model, trained_k
from knn_diffusion.models.continuous.generator import load_denoiser
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.retrieval.backends import ServiceUnavailable, open_backend
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.stages.judging import load_judge
from knn_diffusion.tracking import child_run, model_run_id

log = logging.getLogger(__name__)
SYSTEMS = ("edit", "text_to_image", "input")
# Metrics given a bootstrap CI over the held-out images (an image's prompts resample together), and the
# paired differences of the edit against each baseline.
CI_METRICS = ("clip_score", "clip_gain", "changed_fraction", "ssim_outside", "psnr_outside", "ssim")


def intervals(scores: dict[str, np.ndarray], images: int, seed: int, baseline: dict | None = None) -> dict:
    """{metric, metric_ci_low, metric_ci_high} of the mean over (images, prompts) values - or of the paired
    difference to ``baseline``'s - for each metric with a value everywhere; {} with fewer than 2 images."""
    out: dict[str, float] = {}
    for name in CI_METRICS:
        values = scores[name].reshape(images, -1)
        other = None if baseline is None else baseline[name].reshape(images, -1)
        if images < 2 or not np.isfinite(values).all() or (other is not None and not np.isfinite(other).all()):
            continue
        if np.ptp(values if other is None else values - other) == 0:  # constant (the input vs itself): no spread
            value = float((values if other is None else values - other).flat[0])
            out.update({name: value, f"{name}_ci_low": value, f"{name}_ci_high": value})
            continue
        found = (mean_interval(values, seed=seed) if other is None
                 else paired_difference_interval(values, other, seed=seed))
        out.update(found.as_dict(name))
    return out


def write_system(folder: Path, inputs: np.ndarray, outputs: np.ndarray, prompts: list[str], rows: np.ndarray,
                 run_id: str) -> None:
    """A generate-style folder: ``<i>-<slug>.png`` showing (input | output) + a sidecar with the prompt."""
    folder.mkdir(parents=True)
    gap = np.full((inputs.shape[1], 2, 3), 255, np.uint8)
    for i, (before, after, prompt) in enumerate(zip(inputs, outputs, prompts)):
        stem = f"{i:04d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:40]}"
        save_png(folder / f"{stem}.png", np.concatenate([before, gap, after], axis=1))
        write_json(folder / f"{stem}.json", {"prompt": prompt, "input_row": int(rows[i]), "image": f"{stem}.png",
                                             "model_run_id": run_id})


def evaluate_stage(params) -> None:
    cfg = params.evaluate_manipulation
    sampler = params.edit
    store = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
    test_rows = draw(store.rows("test"), cfg.images, cfg.seed)
    edit_prompts = read_prompts(cfg.prompts_file, within=paths.PROMPTS)
    rows = np.repeat(test_rows, len(edit_prompts))  # every held-out image with every held-out prompt
    prompts = edit_prompts * len(test_rows)
    inputs = store[rows]
    model, _ = load_manipulation_model(paths.MANIPULATION_MODEL)
    text_to_image = load_denoiser(paths.CONTINUOUS_MODEL)
    encoder = load_encoder(params.encoder, paths.ENCODER)
    judge = load_judge(params)
    k = trained_k(model)
    knn = None
    if k:
        backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
        knn = backend.open(params.data.generator_dataset).knn
    cond, _, _ = text_conditions(encoder.encode_texts(prompts), knn, k)
    seeds = [sampler.seed + i for i in range(len(prompts))]
    log.info("%d held-out images x %d edit prompts; judge %s", len(test_rows), len(edit_prompts),
             judge.fingerprint[:16])
    outputs = {"edit": edit_images(model, inputs, cond, sampler, seeds),
               "text_to_image": sample(text_to_image, cond, guidance=sampler.guidance, scheduler=sampler.scheduler,
                                       steps=sampler.steps, seed=seeds),
               "input": inputs}
    tracking = params.tracking
    run_ids = {"edit": model_run_id(paths.MANIPULATION_MODEL, tracking.experiment, tracking.tracking_uri), "input": "",
               "text_to_image": model_run_id(paths.CONTINUOUS_MODEL, tracking.experiment, tracking.tracking_uri)}
    common = {"judge": judge.fingerprint, "change_threshold": cfg.change_threshold, "k": k, "images": len(test_rows),
              "prompts": len(edit_prompts), "guidance": sampler.guidance, "steps": sampler.steps,
              "scheduler": sampler.scheduler.value}
    report, per_item = {}, {}
    with tracked("evaluate_manipulation", params) as run, atomic_dir(paths.EVALUATE_MANIPULATION) as out:
        for system in SYSTEMS:
            scores = {**text_scores(judge, inputs, outputs[system], prompts),
                      **identity_scores(inputs, outputs[system], cfg.change_threshold)}
            per_item[system] = scores
            summary = {**summarise(scores), **intervals(scores, len(test_rows), cfg.seed)}
            finite = {name: value for name, value in summary.items() if math.isfinite(value)}
            report[system] = {name: round(value, 6) for name, value in finite.items()}
            with child_run(system, {**common, "system": system, "model_run_id": run_ids[system]},
                           {"evaluate.kind": "manipulation"}) as child:
                child.metrics(finite)
            write_system(out / system, inputs, outputs[system], prompts, rows, run_ids[system])
            log.info("%s: %s", system, ", ".join(f"{name} {value:.4f}" for name, value in finite.items()))
        for baseline in ("text_to_image", "input"):  # the edit's paired differences to each baseline
            differences = intervals(per_item["edit"], len(test_rows), cfg.seed, per_item[baseline])
            report[f"edit_minus_{baseline}"] = {name: round(value, 6) for name, value in differences.items()}
            run.metrics({f"edit_minus_{baseline}.{name}": value for name, value in differences.items()})
        with open(out / "edits.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            names = list(per_item["edit"])
            writer.writerow(["item", "input_row", "prompt", *[f"{s}.{n}" for s in SYSTEMS for n in names]])
            for i in range(len(prompts)):
                writer.writerow([i, int(rows[i]), prompts[i],
                                 *[f"{per_item[s][n][i]:.6f}" for s in SYSTEMS for n in names]])
        shown = min(cfg.grid_rows, len(prompts))
        changed = changed_region(inputs[:shown], outputs["edit"][:shown], cfg.change_threshold)
        mask = np.repeat(changed[..., None], 3, axis=-1).astype(np.uint8) * 255
        tiles = np.stack([inputs[:shown], outputs["edit"][:shown], outputs["text_to_image"][:shown], mask], axis=1)
        grid = image_grid(tiles.reshape(-1, *tiles.shape[2:]), columns=4)
        save_png(out / "grid.png", grid)
        write_json(out / "evaluate_manipulation.json", {**common, "prompts_file": cfg.prompts_file,
                                                        "edit_prompts": edit_prompts, "rows": test_rows.tolist(),
                                                        "model_run_id": run_ids["edit"],
                                                        "grid_columns": ["input", "edit", "text_to_image",
                                                                         "changed_region_of_edit"]})
        run.image(grid, "evaluate_manipulation/grid_input_edit_text_to_image_changed.png")
        run.artifact(out / "edits.csv", "evaluate_manipulation")
    write_json(paths.EVALUATE_MANIPULATION_METRICS, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate_manipulation", evaluate_stage, argv,
              user_errors=(FileNotFoundError, ValueError, ServiceUnavailable))


if __name__ == "__main__":
    main()
