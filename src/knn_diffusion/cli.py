"""``knn-diffusion`` command line: params validation and presets, and ``generate``."""

from __future__ import annotations

import argparse
import sys
from importlib import resources

import yaml

from knn_diffusion.config import ConfigError, build_params, load_params, to_plain, write_params


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


def _generate_command(args: argparse.Namespace) -> None:
    """Generate from text prompts (or image embeddings) with the trained model and any compatible index."""
    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.generation import generate, load_generator, neighbour_search
    from knn_diffusion.sampling import load_image_embeddings
    from knn_diffusion.stages import paths

    params = load_params(args.params, args.set or [])
    embeddings = load_image_embeddings(args.image_embedding_from) if args.image_embedding_from else None
    if not args.prompts and embeddings is None:
        raise ConfigError("generate: give at least one prompt or --image-embedding-from FILE")
    checkpoint = args.checkpoint or str(paths.CONTINUOUS_MODEL)
    if args.variant:
        from knn_diffusion.training.checkpoint import read_checkpoint_config

        trained = read_checkpoint_config(checkpoint)["model"]["conditioning"]["variant"]
        if trained != args.variant:
            raise ConfigError(f"--variant {args.variant}: the model at {checkpoint} was trained with variant "
                              f"'{trained}'; pass --checkpoint of a {args.variant} run (e.g. after "
                              f"`dvc exp apply <exp>` of a sweep over train_continuous.variant)")
    s = params.sample
    generator = load_generator(checkpoint, scheduler=args.scheduler or s.scheduler)
    encoder = load_encoder(params.encoder, paths.ENCODER)
    knn, sidecar = neighbour_search(args.index or params.data.generator_dataset, paths.INDEX, paths.EMBED,
                                    encoder.fingerprint, encoder.dim, params.retrieval)
    records = generate(generator, out_dir=args.out, knn=knn, prompts=args.prompts or None,
                       encoder=encoder if args.prompts else None, image_embeddings=embeddings,
                       image_embedding_source=args.image_embedding_from or "", k=args.k,
                       guidance=s.guidance if args.guidance is None else args.guidance,
                       steps=s.steps if args.steps is None else args.steps, seed=args.seed, batch_size=args.batch_size, index_sidecar=sidecar)
    for record in records:
        print(f"{args.out}/{record['image']}  k={record['k']}  top neighbour score "
              f"{record['neighbour_scores'][0] if record['neighbour_scores'] else '-'}")
    print(f"{args.out}/grid.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knn-diffusion")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("params", help="validate params.yaml, show it, or apply a preset")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", choices=list_presets(), help="merge a packaged preset into the params file")
    p.add_argument("--show", action="store_true", help="print the validated params with defaults filled in")
    p.add_argument("overrides", nargs="*", help="key=value overrides to validate")
    p.set_defaults(handler=_params_command)

    from knn_diffusion.sampling import add_generate_arguments

    g = commands.add_parser("generate", help="text -> kNN -> guided sampling with the trained model")
    add_generate_arguments(g)
    g.add_argument("--params", default="params.yaml")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="params override (repeatable)")
    g.set_defaults(handler=_generate_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
