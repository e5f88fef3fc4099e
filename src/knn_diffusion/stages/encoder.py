"""DVC stage ``encoder``: align the offline CLIP (or record the pretrained one) and report retrieval recall.

With ``encoder.kind: open_clip`` nothing is trained: the stage records the pretrained model and
measures its recall. With ``encoder.kind: aligned`` the image tower is trained contrastively against
the locked MiniLM text tower on a paired corpus disjoint from the generator's training images: the
Noto emoji with their names, or - when Noto is not installed - the generator dataset's *val* split.
Recall of text->image retrieval is measured on the generator dataset's test split when it has
captions (an image-only dataset skips it, with a log note); pairs whose name occurs there are dropped
from training, so every evaluated name is unseen.
"""

from __future__ import annotations

import logging

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.alignment import rows_without_names, text_to_image_recall, train_alignment
from knn_diffusion.encoders.config import EncoderKind
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)
PAIRED_DATASET = "noto"
LOG_EVERY = 10
SIDECAR = "encoder.json"  # in the out: kind, weights, alignment corpus, fingerprint


def held_out_eval(params: Params) -> tuple[ImageStore, np.ndarray, list[str]]:
    """The generator dataset's test split and its names: recall is measured there, never trained on."""
    generator = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
    rows = generator.rows("test")
    return generator, rows, generator.read_captions().loc[rows].tolist()


def paired_corpus(params: Params, held_out_names: list[str]) -> tuple[np.ndarray, list[str], str]:
    """(images, names, description) for alignment: never the generator's train split, never a test name."""
    noto_dir = paths.dataset_dir(PAIRED_DATASET)
    if PAIRED_DATASET != params.data.generator_dataset and (noto_dir / "manifest.parquet").is_file():
        store = ImageStore.open(noto_dir)
        rows, what = store.rows(), f"{PAIRED_DATASET} (all splits)"
    else:
        store = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
        rows, what = store.rows("val"), f"{params.data.generator_dataset} val split (fallback: no {PAIRED_DATASET})"
        log.warning("paired corpus: %s is unavailable, aligning on %s", PAIRED_DATASET, what)
    names = store.read_captions().loc[rows].tolist()
    keep = rows_without_names(names, held_out_names)
    log.info("paired corpus %s: %d of %d images kept (named, name not in the eval split)", what, len(keep), len(rows))
    return store[rows[keep]], [names[i] for i in keep], what


def encoder_stage(params: Params) -> None:
    cfg = params.encoder
    with tracked("encoder", params) as run:
        generator, test_rows, test_names = held_out_eval(params)
        with atomic_dir(paths.ENCODER) as out:
            facts = {"kind": cfg.kind.value, "eval_split": f"{params.data.generator_dataset}/test"}
            if cfg.kind == EncoderKind.open_clip:
                encoder = load_encoder(cfg)  # downloads the weights on first use unless pretrained is a file
                facts.update(model_name=cfg.model_name, pretrained=cfg.pretrained, corpus="pretrained", pairs=0)
                log.info("pretrained open_clip %s/%s selected: nothing to train", cfg.model_name, cfg.pretrained)
            else:
                images, names, corpus = paired_corpus(params, test_names)
                if len(images) == 0:
                    raise ValueError(f"encoder.kind=aligned needs named images to align on, and {corpus} has none; "
                                     "for an image-only dataset set encoder.kind=open_clip (a pretrained CLIP)")
                facts.update(corpus=corpus, pairs=len(images))
                run.tags({"alignment.corpus": corpus})
                log.info("aligning on %d pairs from %s", len(images), corpus)

                def on_log(step: int, metrics: dict) -> None:
                    if step % LOG_EVERY == 0 or step == cfg.alignment.steps:
                        run.metrics({f"align.{k}": v for k, v in metrics.items()}, step=step)

                encoder = train_alignment(images, names, cfg, out, on_log=on_log, state_dir=paths.ENCODER_STATE)
            write_json(out / SIDECAR, {**facts, "fingerprint": encoder.fingerprint})

        # metrics: numbers only (what the encoder is and was trained on is in the out's sidecar)
        report: dict = {"trained": int(cfg.kind == EncoderKind.aligned), "pairs": facts["pairs"],
                        "eval_images": len(test_rows)}
        if any(isinstance(n, str) and n.strip() for n in test_names):
            recall = text_to_image_recall(encoder, generator[test_rows], test_names,
                                          ks=tuple(cfg.alignment.eval_ks), templates=tuple(cfg.alignment.templates))
            report.update(recall)
            log.info("text->image recall on %s test: %s", params.data.generator_dataset,
                     {k: round(v, 3) for k, v in recall.items() if isinstance(v, float)})
        else:
            log.info("recall not measured: the test split of '%s' has no captions (an image-only dataset); "
                     "the encoder's text->image retrieval is untested here", params.data.generator_dataset)
        run.metrics({k.replace("@", "_at_"): v for k, v in report.items()})
        write_json(paths.ENCODER_METRICS, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("encoder", encoder_stage, argv)


if __name__ == "__main__":
    main()
