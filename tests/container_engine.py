"""A container engine for `make test-stack`: docker when its daemon answers, else podman (Debian's, as root).

Where no image registry answers, base images are made locally (debootstrap + import, tagged with the
upstream name so the Dockerfiles keep their FROM lines) and Python packages come from a wheelhouse
downloaded on the host from requirements.lock (`pip install --no-index --find-links`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_BASES = ("docker.io/library/debian:bookworm-slim", "docker.io/library/python:3.11-slim-bookworm")
# Debian's Python is 3.11.2: redis wants async-timeout below 3.11.3, which the lock (made on 3.11.7) lacks.
# faiss-gpu comes with its own CUDA 12 runtime wheels (torch in the lock uses CUDA 13): fetched with deps.
WHEELHOUSE_EXTRAS = ("setuptools>=68", "async-timeout>=4.0.3", "faiss-gpu==1.15.1")


def sh(cmd: list[str], timeout: float = 3600, env: dict | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


class Engine:
    def __init__(self) -> None:
        docker_up = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        if docker_up:
            self.name, self.compose = "docker", ["docker", "compose"]
        elif shutil.which("podman") and shutil.which("podman-compose"):
            self.name, self.compose = "podman", ["podman-compose"]
            # podman starts containers here only with its default ulimits lowered.
            os.environ.setdefault("CONTAINERS_CONF", str(REPO / "docker" / "test" / "containers.conf"))
        else:
            raise FileNotFoundError("no container engine: docker (with a daemon) or podman + podman-compose")

    def __call__(self, *args: str, timeout: float = 3600) -> str:
        return sh([self.name, *args], timeout=timeout)

    def has_image(self, name: str) -> bool:
        return subprocess.run([self.name, "image", "inspect", name], capture_output=True).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", name).strip())

    def registry_answers(self, image: str = "docker.io/library/debian:bookworm-slim") -> bool:
        try:
            return subprocess.run([self.name, "pull", "-q", image], capture_output=True, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def ensure_local_bases(self, mirror: str = "http://deb.debian.org/debian") -> None:
        """The base images from Debian's mirror when no registry answers (about a minute)."""
        present = [name for name in LOCAL_BASES if self.has_image(name)]
        if present:  # one rootfs serves every name: a new import would void the build cache
            for name in set(LOCAL_BASES) - set(present):
                self("tag", present[0], name)
            return
        if self.registry_answers():
            return
        root = Path(tempfile.mkdtemp(prefix="knn-rootfs-"))
        try:
            sh(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
                "bookworm", str(root), mirror], timeout=1800)
            shutil.rmtree(root / "var" / "lib" / "apt" / "lists", ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run([self.name, "import", "--change", 'CMD ["/bin/bash"]', "-", LOCAL_BASES[0]],
                           stdin=tar.stdout, check=True, capture_output=True)
            tar.wait()
            for name in LOCAL_BASES[1:]:
                self("tag", LOCAL_BASES[0], name)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def build(self, target: str, tag: str, wheelhouse: Path | None) -> float:
        """Build docker/Dockerfile's ``target``; returns the seconds it took."""
        args = ["build", "-f", str(REPO / "docker" / "Dockerfile"), "--target", target, "-t", tag]
        if wheelhouse is not None:  # only podman mounts folders into a build
            args += ["--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels", "-v", f"{wheelhouse}:/wheels:ro"]
        start = time.time()
        self(*args, str(REPO))
        return time.time() - start


def wheelhouse(folder: Path) -> Path:
    """Every wheel of requirements.lock (+ the GPU image's faiss), downloaded once on the host."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = hashlib.sha256(((REPO / "requirements.lock").read_text() + repr(WHEELHOUSE_EXTRAS)).encode()).hexdigest()
    stamp = folder / ".complete-for"
    if stamp.exists() and stamp.read_text() == wanted:  # pip takes minutes to re-check a complete folder
        return folder
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(folder)]
    sh([*pip, "--no-deps", "-r", str(REPO / "requirements.lock")], timeout=3600)
    sh([*pip, *WHEELHOUSE_EXTRAS], timeout=3600)
    stamp.write_text(wanted)
    return folder
