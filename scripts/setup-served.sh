#!/usr/bin/env bash
# Idempotent: the venv of LAION's kNN service (`clip-retrieval back`, for retrieval.backend=served) at
# .venv-served, with the exact versions of services/clip-retrieval/requirements.lock. clip-retrieval pins
# numpy<2, pandas<3, pyarrow<16 and open_clip_torch<3, which clash with .venv's, so it has a venv of its own.
# Running it again with an unchanged lock installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

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
    echo "setup-served: installing $lock into $VENV (first time: about 2-3 minutes and 5 GB)"
    # (grep drops warnings about index locations some machines' pip.conf names but lack)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$lock" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    echo "$want" > "$stamp"
else
    echo "setup-served: $VENV matches $lock; nothing to install"
fi
