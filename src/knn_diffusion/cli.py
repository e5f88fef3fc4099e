"""``knn-diffusion`` command line: params presets and validation (generation mounts here too)."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knn-diffusion")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("params", help="validate params.yaml, show it, or apply a preset")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", choices=list_presets(), help="merge a packaged preset into the params file")
    p.add_argument("--show", action="store_true", help="print the validated params with defaults filled in")
    p.add_argument("overrides", nargs="*", help="key=value overrides to validate")
    p.set_defaults(handler=_params_command)
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
