#!/usr/bin/env bash
# The venv of LAION's kNN service for retrieval.backend=served: `clip-retrieval back` (PyPI clip-retrieval),
# exactly as requirements-served.lock pins it. scripts/setup.sh runs this when KNN_SETUP_SERVED=1 (`make
# test-slow` sets it); running it again with an unchanged lock installs nothing.
#
# clip-retrieval pins numpy<2, pandas<3, pyarrow<16 and open_clip<3, which clash with the project venv, so it
# gets its own site-packages (.venv-served). Its torch and torchvision (about 5 GB, which its pins accept) come
# from the project venv through a path entry that Python reads after the venv's own packages: every package
# requirements-served.lock pins wins over the project's copy.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
SERVED=${SERVED_VENV:-.venv-served}
PYTHON=${PYTHON:-python3}
stamp="$SERVED/.installed-lock"
want=$(cat requirements-served.lock scripts/setup_served.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "setup: $SERVED matches requirements-served.lock; nothing to install"
    exit 0
fi

echo "setup: creating $SERVED (clip-retrieval back, requirements-served.lock over the project's torch)"
rm -rf "$SERVED"
"$PYTHON" -m venv "$SERVED"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
project_site=$(cd "$("$VENV/bin/python" -c "$purelib")" && pwd)
echo "$project_site" > "$("$SERVED/bin/python" -c "$purelib")/zz-project-venv.pth"
# (grep drops warnings about index locations some machines' pip.conf names but lack)
"$SERVED/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements-served.lock \
    2> >(grep -v -e 'is ignored: it is neither a file nor a directory' -e 'outside environment' >&2)

# The CLIP the service loads at start-up, for text or image queries sent to it directly. knn-diffusion sends
# embeddings, so this one is never used by it: an untrained open_clip ViT-S-32-alt from a fixed seed, for a
# service without network access. With network access, export with --service-clip naming the index's own CLIP.
"$SERVED/bin/python" - "$SERVED/service-clip-ViT-S-32-alt.pt" <<'PY'
import sys

import open_clip
import torch

torch.manual_seed(0)
model = open_clip.create_model("ViT-S-32-alt")
torch.save({name: value.half() for name, value in model.state_dict().items()}, sys.argv[1])
PY
echo "$want" > "$stamp"
