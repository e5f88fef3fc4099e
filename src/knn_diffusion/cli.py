"""``knn-diffusion`` command line: params validation and presets, ``generate``, ``edit`` and ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from knn_diffusion.config import ConfigError, build_params, load_params, to_plain, write_params
from knn_diffusion.config_fields import check_field, check_output_folder
from knn_diffusion.manipulation.cli import (
    add_edit_arguments,
    check_edit_arguments,
    model_resolution,
    output_stem,
    read_input_image,
)
from knn_diffusion.stack.processes import StackError


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("knn_diffusion.presets").iterdir() if p.name.endswith(".yaml"))


def apply_preset(name: str, params_path: str) -> None:
    """Merge a packaged preset onto params.yaml, validate, write back atomically."""
    if name not in list_presets():
        raise ConfigError(f"preset {name!r}: expected one of {list_presets()}")
    preset = yaml.safe_load(resources.files("knn_diffusion.presets").joinpath(f"{name}.yaml").read_text())
    current = to_plain(load_params(params_path))
    merged = build_params(current, where=params_path)
    merged = build_params(_deep_merge(to_plain(merged), preset), where=f"preset {name}")
    write_params(merged, params_path)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _params_command(args: argparse.Namespace) -> None:
    if args.preset:
        apply_preset(args.preset, args.params)
        print(f"{args.params}: applied preset '{args.preset}'")
    params = load_params(args.params, args.overrides)
    if args.show:
        print(yaml.safe_dump(to_plain(params), sort_keys=False), end="")
    else:
        print(f"{args.params}: valid")


def load_image_embeddings(path: str | os.PathLike) -> np.ndarray:
    """A .npy file with one (d,) or several (N, d) finite image embeddings -> (N, d) float32."""
    path = Path(path)
    if path.suffix != ".npy" or not path.is_file():
        raise FileNotFoundError(f"{path}: expected an existing .npy file of image embeddings, (d,) or (N, d)")
    array = np.load(path)
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        raise ValueError(f"{path}: expected float embeddings of shape (d,) or (N, d), got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the embeddings contain NaN or infinite values")
    array = np.atleast_2d(array).astype(np.float32)
    zero = np.flatnonzero(np.linalg.norm(array, axis=1) == 0)
    if len(zero):  # no direction: nothing to retrieve neighbours for or condition on
        raise ValueError(f"{path}: embedding {zero[0]} is all zeros (a zero-norm vector has no direction); "
                         "give a non-zero image embedding")
    return array


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``knn-diffusion generate``; ``None`` defaults mean "from params / the trained run"."""
    from knn_diffusion.models.config import ConditioningVariant
    from knn_diffusion.models.continuous.config import SchedulerName

    parser.add_argument("prompts", nargs="*", help="text prompts, one image each")
    parser.add_argument("--k", type=int, default=None, help="neighbours to retrieve (default: as trained)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale lambda")
    parser.add_argument("--index", default=None, help="index directory to retrieve from (any compatible index)")
    parser.add_argument("--variant", default=None, choices=[v.value for v in ConditioningVariant],
                        help="which trained conditioning variant's model to load")
    parser.add_argument("--model", default=None, choices=["continuous", "discrete"],
                        help="which backbone generates: models/<model> (default: continuous, or whatever "
                             "--checkpoint holds)")
    parser.add_argument("--checkpoint", default=None, help="a model checkpoint directory (overrides --variant)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--scheduler", default=None, choices=[s.value for s in SchedulerName])
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--out", default="outputs/generate",
                        help="output directory, replaced as a whole when the run succeeds (untouched otherwise)")
    parser.add_argument("--image-embedding-from", default=None, metavar="FILE",
                        help=".npy image embedding(s), (d,) or (N, d): condition on an image instead of text")
    return parser


def check_generate_arguments(args: argparse.Namespace) -> None:
    """Refuse bad options before anything loads; numeric limits are the params schema's own ranges."""
    from knn_diffusion.config import ContinuousSampleSettings
    from knn_diffusion.models.continuous.config import ContinuousTrainConfig

    for number, prompt in enumerate(args.prompts, 1):
        if not prompt.strip():
            raise ConfigError(f"prompt {number} is empty: give text to generate from (or only --image-embedding-from)")
    if args.prompts and args.image_embedding_from:
        raise ConfigError("give prompts or --image-embedding-from FILE, not both")
    if not args.prompts and not args.image_embedding_from:
        raise ConfigError("generate: give at least one prompt or --image-embedding-from FILE")
    for option, owner, name in (("--steps", ContinuousSampleSettings, "steps"),
                                ("--guidance", ContinuousSampleSettings, "guidance"),
                                ("--k", ContinuousTrainConfig, "k")):
        value = getattr(args, name)
        if value is not None:
            check_field(owner, name, value, option)
    check_output_folder(args.out, "generate")


def _generate_command(args: argparse.Namespace) -> None:
    """Generate from text prompts (or image embeddings) with the trained model and any compatible index."""
    from knn_diffusion.backbones import load_generator
    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.generation import generate
    from knn_diffusion.io import atomic_dir
    from knn_diffusion.retrieval.backends import open_backend
    from knn_diffusion.stages import paths
    from knn_diffusion.tracking import model_run_id
    from knn_diffusion.training.checkpoint import read_checkpoint_config

    check_generate_arguments(args)
    params = load_params(args.params, args.set or [])
    embeddings = load_image_embeddings(args.image_embedding_from) if args.image_embedding_from else None
    checkpoint = args.checkpoint or str(paths.model_dir(args.model or "continuous"))
    if args.variant:
        trained = read_checkpoint_config(checkpoint)["model"]["conditioning"]["variant"]
        if trained != args.variant:
            raise ConfigError(f"--variant {args.variant}: the model at {checkpoint} was trained with variant "
                              f"'{trained}'; pass --checkpoint of a {args.variant} run (e.g. after "
                              f"`dvc exp apply <exp>` of a sweep over train_continuous.variant)")
    backbone = args.model or read_checkpoint_config(checkpoint).get("backbone", "continuous")
    s = getattr(params.sample, backbone)  # the backbone's sampler defaults: sample.continuous / sample.discrete
    options = s.generator_options()
    if args.scheduler:
        if "scheduler" not in options:
            raise ConfigError(f"--scheduler {args.scheduler}: the {backbone} model has no diffusers scheduler")
        options["scheduler"] = args.scheduler
    generator = load_generator(checkpoint, backbone=backbone, **options)
    generator.run_id = model_run_id(checkpoint, params.tracking.experiment,
                                    params.tracking.tracking_uri) or generator.run_id
    encoder = load_encoder(params.encoder, paths.ENCODER)
    backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
    neighbours = backend.open(args.index or params.data.generator_dataset)
    knn, sidecar = neighbours.knn, neighbours.sidecar
    with atomic_dir(Path(args.out).resolve()) as out:  # a failed run leaves --out as it was
        records = generate(generator, out_dir=out, knn=knn, prompts=args.prompts or None,
                           encoder=encoder if args.prompts else None, image_embeddings=embeddings,
                           image_embedding_source=args.image_embedding_from or "", k=args.k,
                           guidance=s.guidance if args.guidance is None else args.guidance,
                           steps=s.steps if args.steps is None else args.steps, seed=args.seed,
                           batch_size=args.batch_size, index_sidecar=sidecar)
    for record in records:
        print(f"{args.out}/{record['image']}  k={record['k']}  top neighbour score "
              f"{record['neighbour_scores'][0] if record['neighbour_scores'] else '-'}")
    print(f"{args.out}/grid.png")


def _edit_command(args: argparse.Namespace) -> None:
    """Check everything, then edit the input once per prompt and write the results atomically."""
    from knn_diffusion.stages import paths

    check_edit_arguments(args)
    params = load_params(args.params, args.set or [])
    checkpoint = Path(args.checkpoint or paths.MANIPULATION_MODEL)
    image = read_input_image(args.input, model_resolution(checkpoint))

    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.images import image_grid, save_png
    from knn_diffusion.io import atomic_dir, content_sha256, write_json
    from knn_diffusion.manipulation.editing import edit_images, text_conditions, to_input_size, to_model_size
    from knn_diffusion.manipulation.model import load_manipulation_model, trained_k
    from knn_diffusion.retrieval.backends import open_backend
    from knn_diffusion.tracking import model_run_id

    model, config = load_manipulation_model(checkpoint)
    encoder = load_encoder(params.encoder, paths.ENCODER)
    k = trained_k(model) if args.k is None else args.k
    knn, sidecar = (None, {})
    if k > 0:
        backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
        neighbours = backend.open(args.index or params.data.generator_dataset)
        knn, sidecar = neighbours.knn, neighbours.sidecar
    sampler = dataclasses.replace(params.edit, **{name: getattr(args, name) for name in ("guidance", "steps", "seed")
                                                  if getattr(args, name) is not None})
    source = to_model_size(image, model.config.unet.resolution)
    cond, ids, scores = text_conditions(encoder.encode_texts(args.prompts), knn, k)
    edits = edit_images(model, np.repeat(source[None], len(args.prompts), axis=0), cond, sampler)
    outputs = [to_input_size(image, source, edited) for edited in edits]
    input_sha256 = hashlib.sha256(Path(args.input).read_bytes()).hexdigest()
    model_sha256 = content_sha256(checkpoint)  # the folder names no run: its training run is found by this hash
    run_id = model_run_id(checkpoint, params.tracking.experiment, params.tracking.tracking_uri)
    with atomic_dir(Path(args.out).resolve()) as out:  # a failed run leaves --out as it was
        for i, (prompt, output) in enumerate(zip(args.prompts, outputs)):
            stem = output_stem(i, prompt)
            save_png(out / f"{stem}.png", output)
            write_json(out / f"{stem}.json", {
                "prompt": prompt, "input": str(args.input), "input_sha256": input_sha256,
                "input_size": [image.shape[1], image.shape[0]], "model_resolution": model.config.unet.resolution,
                "seed": sampler.seed + i, "k": k, "neighbour_ids": ids[i].tolist(),
                "neighbour_scores": [float(s) for s in scores[i]], "guidance": sampler.guidance,
                "steps": sampler.steps, "scheduler": sampler.scheduler.value, "checkpoint": str(checkpoint),
                "model_run_id": run_id, "model_sha256": model_sha256,
                "text_to_image_sha256": config.get("text_to_image_sha256", ""),
                "encoder_fingerprint": encoder.fingerprint, "index": sidecar.get("dataset", ""),
                "index_fingerprint": sidecar.get("sha256", ""), "index_fraction": sidecar.get("index_fraction", 1.0),
                "subset_seed": sidecar.get("subset_seed", 0), "score_filter": sidecar.get("score_filter", [0.0, 1.0]),
                "image": f"{stem}.png"})
            print(f"{args.out}/{stem}.png  {prompt!r}  seed {sampler.seed + i}")
        save_png(out / "grid.png", image_grid(np.stack([image, *outputs]), columns=1 + len(outputs)))
    print(f"{args.out}/grid.png  (input | edits)")


def _report_command(args: argparse.Namespace) -> None:
    """Ablation tables and plots from the evaluate runs of an experiment, logged to a `report` run."""
    from knn_diffusion.evaluation.report import publish_report
    from knn_diffusion.tracking import quiet_artifact_downloads, tracking_uri

    quiet_artifact_downloads()
    run_id, files = publish_report(args.experiment, args.out, pipeline_runs=args.pipeline_run or None,
                                   feature=args.feature, tracking_uri=tracking_uri())
    for path in files:
        print(path)
    print(f"logged to MLflow run {run_id} (experiment '{args.experiment}')")


def _serve_export_command(args: argparse.Namespace) -> None:
    """Indexes in the layout `clip-retrieval back` serves (retrieval.backend=served)."""
    from knn_diffusion.retrieval.served_export import export_index
    from knn_diffusion.stages import paths

    roots = paths.retrieval_roots()
    for index in args.indexes:
        folder = Path(index) if Path(index).is_dir() else roots.index / index
        clip = {"service_clip": args.service_clip} if args.service_clip else {}
        indices = export_index(folder, roots.embed, roots.ingest, args.out, **clip)
    print(f"{indices}\nserve (make served-venv): .venv-served/bin/python services/clip-retrieval/back_loopback.py "
          f"--indices_paths {indices} --port 1234")


def _stack_command(args: argparse.Namespace) -> None:
    """Start, stop or show the team stack as local processes (knn_diffusion/stack/)."""
    from knn_diffusion.stack.command import DEFAULT_PORTS, down, status, up

    if args.action == "up":
        ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS if getattr(args, f"{name}_port")}
        settings = up(Path(args.data_dir), host=args.host, ports=ports)
        for service, address, health in status(settings.data_dir):
            print(f"{service:<12} {address:<22} {health}")
        print(f"source {settings.env_file}   # MLFLOW_TRACKING_URI, PREFECT_API_URL, the S3 remote")
    elif args.action == "down":
        stopped = down(Path(args.data_dir))
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    else:
        for service, address, health in status(Path(args.data_dir)):
            print(f"{service:<12} {address:<22} {health}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knn-diffusion")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("params", help="validate params.yaml, show it, or apply a preset")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", choices=list_presets(), help="merge a packaged preset into the params file")
    p.add_argument("--show", action="store_true", help="print the validated params with defaults filled in")
    p.add_argument("overrides", nargs="*", help="key=value overrides to validate")
    p.set_defaults(handler=_params_command)

    g = commands.add_parser("generate", help="text -> kNN -> guided sampling with the trained model")
    add_generate_arguments(g)
    g.add_argument("--params", default="params.yaml")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="params override (repeatable)")
    g.set_defaults(handler=_generate_command)

    e = commands.add_parser("edit", help="edit an image from text alone (no mask) with the manipulation model")
    add_edit_arguments(e)
    e.set_defaults(handler=_edit_command)

    r = commands.add_parser("report", help="ablation tables (markdown + CSV) and plots from the evaluate runs")
    r.add_argument("--experiment", default="knn-diffusion", help="MLflow experiment (tracking.experiment)")
    r.add_argument("--pipeline-run", action="append", metavar="NAME",
                   help="only runs of this pipeline run / sweep experiment (repeatable; default: all)")
    r.add_argument("--feature", default=None, help="the FID/KID feature to report when runs used several")
    r.add_argument("--out", default="outputs/report", help="output directory")
    r.set_defaults(handler=_report_command)

    x = commands.add_parser("serve-export", help="write indexes for LAION's kNN service (retrieval.backend=served)")
    x.add_argument("indexes", nargs="+", help="datasets with an index under data/index, or index directories")
    x.add_argument("--out", default="served", help="folder for indices.json and one folder per index")
    x.add_argument("--service-clip", help="the CLIP the service loads at start-up, an all_clip name (default: "
                   "retrieval/served_export.py's DEFAULT_SERVICE_CLIP); knn-diffusion itself sends embeddings")
    x.set_defaults(handler=_serve_export_command)

    from knn_diffusion.stack.command import DEFAULT_PORTS

    s = commands.add_parser("stack", help="the team stack (Postgres, S3, MLflow, Prefect, workers) as local processes")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--data-dir", default=".stack", help="databases, bucket snapshot, logs, stack.env (default: .stack)")
    s.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default: loopback)")
    for name, port in DEFAULT_PORTS.items():
        s.add_argument(f"--{name}-port", type=_positive_int, default=None, help=f"default {port}")
    s.set_defaults(handler=_stack_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    # input the user can fix (a service that is down included): one line, no traceback
    except (ConfigError, ValueError, FileNotFoundError, StackError, ConnectionError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
