"""DVC stage ``encoder``: align the offline CLIP (or record the pretrained one) and report retrieval recall.

With ``encoder.kind: open_clip`` nothing is trained: the stage records the pretrained model and
measures its recall. With ``encoder.kind: aligned`` the image tower is trained contrastively against
the locked MiniLM text tower on paired corpora disjoint from the generator's images: the emoji styles
of ``encoder.alignment.datasets`` (Noto, and the npm styles setup installs) with their names, or - when
none is ingested - the generator dataset's *val* split. Recall of text->image retrieval is measured on
the generator dataset's test split when it has captions (an image-only dataset skips it, with a log
note); pairs whose name occurs there are dropped from training, so every evaluated name is unseen.
The ``judge`` stage trains the evaluation's judge with the same code (:func:`encoder_stage`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from knn_diffusion.config import Params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.alignment import rows_without_names, text_to_image_recall, train_alignment
from knn_diffusion.encoders.config import EncoderConfig, EncoderKind
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.io import atomic_dir, atomic_path, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)
LOG_EVERY = 10
SIDECAR = "encoder.json"  # in the out: kind, weights, alignment corpus, fingerprint
PAIRS = "pairs.parquet"  # in the out: dataset and content hash of every training pair


@dataclass
class PairedCorpus:
    images: np.ndarray        # uint8 (N, R, R, 3)
    names: list[str]          # N captions
    pairs: pd.DataFrame       # dataset, content_hash per pair
    description: str


def held_out_eval(params: Params) -> tuple[ImageStore, np.ndarray, list[str]]:
    """The generator dataset's test split and its names: recall is measured there, never trained on."""
    generator = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
    rows = generator.rows("test")
    return generator, rows, generator.read_captions().loc[rows].tolist()


def _named_rows(store: ImageStore, rows: np.ndarray, held_out_names: list[str]) -> tuple[np.ndarray, list[str]]:
    names = store.read_captions().loc[rows].tolist()
    keep = rows_without_names(names, held_out_names)
    return rows[keep], [names[i] for i in keep]


def paired_corpus(params: Params, cfg: EncoderConfig, held_out_names: list[str],
                  fallback: bool = True) -> PairedCorpus:
    """Every named image of the ingested ``cfg.alignment.datasets`` (never the generator's) whose name is not held out.

    With none of them ingested: the generator dataset's val split when ``fallback``, else an error.
    """
    sources = [(name, ImageStore.open(paths.dataset_dir(name)), None) for name in cfg.alignment.datasets
               if name != params.data.generator_dataset and (paths.dataset_dir(name) / "manifest.parquet").is_file()]
    if not sources:
        listed = cfg.alignment.datasets
        if not fallback:
            raise ValueError(f"alignment.datasets {listed}: none is ingested apart from the generator's "
                             "(scripts/setup.sh installs the npm emoji styles); or choose kind=open_clip")
        generator = params.data.generator_dataset
        log.warning("paired corpus: none of %s is ingested, aligning on the %s val split", listed, generator)
        sources = [(generator, ImageStore.open(paths.dataset_dir(generator)), "val")]
    images, names, pairs = [], [], []
    for name, store, split in sources:
        rows, kept = _named_rows(store, store.rows(split), held_out_names)
        log.info("paired corpus %s: %d of %d images kept (named, name not in the eval split)", name, len(rows),
                 len(store.rows(split)))
        images.append(store[rows])
        names += kept
        pairs.append(pd.DataFrame({"dataset": name,
                                   "content_hash": store.manifest["content_hash"].to_numpy()[rows]}))
    description = " + ".join(name + (f" {split} split" if split else "") for name, _, split in sources)
    return PairedCorpus(np.concatenate(images), names, pd.concat(pairs, ignore_index=True), description)


def encoder_stage(params: Params, section: str = "encoder", out_dir: Path = paths.ENCODER,
                  metrics_path: Path = paths.ENCODER_METRICS, state_dir: Path = paths.ENCODER_STATE,
                  check_pairs=None) -> None:
    """Align (or record) the encoder of params ``section`` and measure its recall on the test split.

    ``check_pairs(pairs, test_hashes)`` may refuse the training pairs before any training (the judge's
    independence check).
    """
    cfg: EncoderConfig = getattr(params, section)
    with tracked(section, params) as run:
        generator, test_rows, test_names = held_out_eval(params)
        with atomic_dir(out_dir) as out:
            facts = {"kind": cfg.kind.value, "eval_split": f"{params.data.generator_dataset}/test"}
            if cfg.kind == EncoderKind.open_clip:
                encoder = load_encoder(cfg)  # downloads the weights on first use unless pretrained is a file
                facts.update(model_name=cfg.model_name, pretrained=cfg.pretrained, corpus="pretrained", pairs=0)
                log.info("pretrained open_clip %s/%s selected: nothing to train", cfg.model_name, cfg.pretrained)
            else:
                corpus = paired_corpus(params, cfg, test_names, fallback=section == "encoder")
                if len(corpus.images) == 0:
                    raise ValueError(f"{section}.kind=aligned needs named images to align on, and "
                                     f"{corpus.description} has none; for an image-only dataset set "
                                     f"{section}.kind=open_clip (a pretrained CLIP)")
                if check_pairs is not None:
                    check_pairs(corpus.pairs, generator.manifest["content_hash"].to_numpy()[test_rows])
                with atomic_path(out / PAIRS) as tmp:
                    corpus.pairs.to_parquet(tmp, index=False)
                facts.update(corpus=corpus.description, pairs=len(corpus.images))
                run.tags({"alignment.corpus": corpus.description})
                log.info("aligning on %d pairs from %s", len(corpus.images), corpus.description)

                def on_log(step: int, metrics: dict) -> None:
                    if step % LOG_EVERY == 0 or step == cfg.alignment.steps:
                        run.metrics({f"align.{k}": v for k, v in metrics.items()}, step=step)

                encoder = train_alignment(corpus.images, corpus.names, cfg, out, on_log=on_log, state_dir=state_dir)
            write_json(out / SIDECAR, {**facts, "fingerprint": encoder.fingerprint})

        # metrics: numbers only (what the encoder is and was trained on is in the out's sidecar)
        report: dict = {"trained": int(cfg.kind == EncoderKind.aligned), "pairs": facts["pairs"],
                        "eval_images": len(test_rows)}
        if any(isinstance(n, str) and n.strip() for n in test_names):
            recall = text_to_image_recall(encoder, generator[test_rows], test_names,
                                          ks=tuple(cfg.alignment.eval_ks), templates=tuple(cfg.alignment.templates))
            report.update(recall)
            log.info("%s: text->image recall on %s test: %s", section, params.data.generator_dataset,
                     {k: round(v, 3) for k, v in recall.items() if isinstance(v, float)})
        else:
            log.info("recall not measured: the test split of '%s' has no captions (an image-only dataset); "
                     "the encoder's text->image retrieval is untested here", params.data.generator_dataset)
        run.metrics({k.replace("@", "_at_"): v for k, v in report.items()})
        write_json(metrics_path, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("encoder", encoder_stage, argv)


if __name__ == "__main__":
    main()
