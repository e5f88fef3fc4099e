#!/usr/bin/env bash
# Idempotent setup: a venv with the exact versions in requirements.lock, the project installed
# editable, the npm emoji styles pinned by emoji-styles/package-lock.json, and the Noto Color Emoji font
# (second sticker set) where apt is available.
# Running it again with an unchanged lock file installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-lock.sh

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed-lock"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pinned packages from requirements.lock (7 GB; about a minute with uv, bytecode compiled)"
    install_lock "$VENV" requirements.lock
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
    echo "$want" > "$stamp"
else
    echo "setup: $VENV matches requirements.lock; nothing to install"
fi

# Emoji styles from npm (paired image/name data for the encoders), exactly as emoji-styles/package-lock.json
# pins them; `npm ci` again only when the lock changed.
styles_stamp=emoji-styles/node_modules/.installed-lock
styles_want=$(sha256sum emoji-styles/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$styles_stamp" 2>/dev/null)" != "$styles_want" ]; then
    if command -v npm >/dev/null; then
        echo "setup: installing the emoji styles of emoji-styles/package-lock.json (npm ci)"
        npm ci --prefix emoji-styles --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null
        echo "$styles_want" > "$styles_stamp"
    else
        echo "setup: NOTE npm is not installed: the npm emoji styles are skipped (the encoder aligns on Noto alone)"
    fi
fi

# Debian packages: the second emoji set; for the tests, the headless browser the UI tests drive, the
# Postgres server behind the MLflow tracking-server test, and a compose implementation that validates
# docker/compose.yaml (there is no Docker engine here; `docker-compose config` needs none).
missing=""
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing="$missing fonts-noto-color-emoji"
command -v chromium >/dev/null || missing="$missing chromium chromium-driver"
command -v docker-compose >/dev/null || missing="$missing docker-compose"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
# `make test-stack` only (KNN_SETUP_CONTAINERS=1): a container engine and local base images.
if [ "${KNN_SETUP_CONTAINERS:-0}" = 1 ] && ! docker info >/dev/null 2>&1; then
    for pkg in podman podman-compose debootstrap; do command -v $pkg >/dev/null || missing="$missing $pkg"; done
fi
if [ -n "$missing" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages:$missing"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null \
            || echo "setup: WARNING could not install$missing (noto dataset skipped / browser tests skipped)"
    else
        echo "setup: NOTE Debian packages$missing are not installed and apt-get is not usable here;"
        echo "       the 'noto' dataset is skipped (the encoder aligns on a disjoint OpenMoji split) and browser tests skip."
    fi
fi
