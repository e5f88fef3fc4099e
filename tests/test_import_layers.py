"""The layers of docs/architecture.md, enforced: import-linter's contracts in pyproject.toml hold for the
code, and each contract catches an import planted against it (in a copy of the sources)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

# (module to plant the import in, the import, the contract that must name it)
PLANTED = [
    ("src/knn_diffusion/training/loop.py", "import knn_diffusion.models.continuous.unet",
     "Layers: orchestration and stages above the library"),
    ("src/knn_diffusion/retrieval/search.py", "import tests.dvc_repo", "The library imports neither flows nor tests"),
    ("src/knn_diffusion/io.py", "import flows.dag", "The library imports neither flows nor tests"),
    ("src/knn_diffusion/encoders/encoder.py", "import knn_diffusion.encoders.store",  # store imports encoder
     "No import cycles between the subpackages"),
]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def test_the_code_keeps_every_layer_contract():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """The Python sources and the contracts, copied (no data, no venv)."""
    root = tmp_path_factory.mktemp("layers")
    for part in ("src/knn_diffusion", "flows", "tests"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.html"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.mark.parametrize("module, planted, contract", PLANTED)
def test_a_planted_wrong_import_breaks_its_contract_and_is_named(sources, module, planted, contract):
    path = sources / module
    original = path.read_text()
    path.write_text(f"{original}\n{planted}  # planted by the test\n")
    try:
        done = lint(sources)
    finally:
        path.write_text(original)
    assert done.returncode == 1, done.stdout[-3000:]
    broken = done.stdout[done.stdout.index("Broken contracts"):]
    assert contract in broken
    importer = module.removeprefix("src/").removesuffix(".py").replace("/", ".")
    assert importer in broken or importer.rsplit(".", 1)[0] in broken, broken
