#!/usr/bin/env bash
# Idempotent: the venv of LAION's kNN service (`clip-retrieval back`, for retrieval.backend=served) at
# .venv-served, with the exact versions of services/clip-retrieval/requirements.lock. clip-retrieval pins
# numpy<2, pandas<3, pyarrow<16 and open_clip_torch<3, which clash with .venv's, so it has a venv of its own.
# Running it again with an unchanged lock installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-lock.sh

VENV=${SERVED_VENV:-.venv-served}
PYTHON=${PYTHON:-python3}
lock=services/clip-retrieval/requirements.lock
stamp="$VENV/.installed-lock"
want=$(sha256sum "$lock" | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup-served: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup-served: installing $lock into $VENV (5 GB; about a minute with uv, bytecode compiled)"
    install_lock "$VENV" "$lock"
    echo "$want" > "$stamp"
else
    echo "setup-served: $VENV matches $lock; nothing to install"
fi
