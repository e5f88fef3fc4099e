"""What every stage's ``main`` shares: argument parsing, params loading, error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from knn_diffusion.config import ConfigError, Params, load_params


def run_stage(name: str, body: Callable[[Params], None], argv: list[str] | None = None) -> None:
    """Parse ``[--params FILE] [key=value ...]``, validate, run ``body``; exit 2 on bad config."""
    parser = argparse.ArgumentParser(prog=f"python -m knn_diffusion.stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", help="ad-hoc overrides as key=value (validated)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API client logs every request
    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    body(params)
