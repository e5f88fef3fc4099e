"""retrieval.backend=served against the real service: LAION's kNN service (``clip-retrieval back``) from its
own venv (``.venv-served``: ``make served-venv``), started on a free loopback port over indexes that
``knn-diffusion serve-export`` wrote.

* backend equivalence: the local and the served backend return the same content ids (and similarities,
  embeddings, scores, images) for the same queries: Flat, IVF-PQ + re-rank, a subset with a per-query
  score quantile, and the tiny pipeline's own index exported by the real CLI;
* ``knn-diffusion generate`` refuses a served index built with another encoder with one ``error:`` line;
* the service killed mid-sample (after the first index's images, as it answers the second index's first
  query) and mid-evaluation (after the first kNN grid point): ``sample@continuous`` and
  ``evaluate@continuous`` fail with one ``error: retrieval.served_url=...`` line and write no outputs;
* every service a test starts is killed (its process group) whatever the test does.

Wall time: 105 s for the 7 tests on 2 shared cores, two tiny pipelines and four service start-ups included.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from knn_diffusion.retrieval.backends import LocalRoots, open_backend
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig, RetrievalConfig
from knn_diffusion.retrieval.inference import SCORES_FILE
from knn_diffusion.retrieval.served_export import export_index
from knn_diffusion.stages import paths
from tests.conftest import REPO, copy_outputs
from tests.embedding_helpers import write_clustered_store

SERVED_VENV = REPO / ".venv-served"
SERVED_PYTHON = SERVED_VENV / "bin" / "python"
LAUNCHER = REPO / "services" / "clip-retrieval" / "back_loopback.py"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (SERVED_VENV / "bin" / "clip-retrieval").exists(),
    reason=".venv-served is absent: `make served-venv` (scripts/setup-served.sh) creates the venv of LAION's kNN "
           "service (clip-retrieval back) these tests start")]

N, D, K = 2_000, 32, 5
FACTORIES = {"flat": "Flat", "ivfpq": "IVF16,PQ16x4fs,Refine(SQfp16)"}
PROMPTS = [f"an emoji of a {thing}" for thing in ("cat", "dog", "red heart", "star", "tree", "car", "sun", "moon",
                                                  "fish", "bird", "apple", "house", "flower", "smile", "ghost", "key")]


def service_env() -> dict[str, str]:
    """The service's environment: nothing of the project's venv, nothing downloaded, one thread."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "KNN_SERVED_HOST": "127.0.0.1", "WANDB_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """One ``clip-retrieval back`` in its own process group; ``on_line`` sees each line of its log as it comes."""

    def __init__(self, indices: Path, on_line: Callable[[str], None] | None = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.lines: list[str] = []
        self.on_line = on_line
        self.process = subprocess.Popen(
            [str(SERVED_PYTHON), str(LAUNCHER), "--indices_paths", str(indices), "--port", self.url.rsplit(":", 1)[1]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=service_env(),
            cwd=indices.parent)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if self.on_line is not None:
                self.on_line(line)

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def wait_ready(self, timeout_s: float = 300) -> Service:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"clip-retrieval back exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/indices-list", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"clip-retrieval back did not answer within {timeout_s} s:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self.reader.join(timeout=10)


@contextmanager
def running(indices: Path, on_line: Callable[[str], None] | None = None) -> Iterator[Service]:
    """A started service over ``indices``, killed on the way out however the block ends."""
    service = Service(indices, on_line)
    try:
        yield service.wait_ready()
    finally:
        service.kill()


@pytest.fixture(scope="module")
def service_clip(tmp_path_factory) -> str:
    """The CLIP the service loads at start-up (never used: knn-diffusion sends its own query embeddings): a
    randomly initialised ViT-S-32-alt saved by the service's own open_clip, named as a local file."""
    weights = tmp_path_factory.mktemp("service-clip") / "vit-s-32-alt.pt"
    subprocess.run([str(SERVED_PYTHON), "-c", "import sys, torch, open_clip; torch.manual_seed(0); torch.save("
                    "open_clip.create_model('ViT-S-32-alt').half().state_dict(), sys.argv[1])", str(weights)],
                   check=True, env=service_env())
    return f"open_clip:ViT-S-32-alt/{weights}"  # weights is absolute: ViT-S-32-alt//tmp/...


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, service_clip):
    """A Flat and an IVF-PQ + re-rank index (with a score column) over one store of N vectors whose ids are
    not 0..N-1, exported and served by one service; yields (local roots, vectors, the service)."""
    root = tmp_path_factory.mktemp("served-synthetic")
    store = root / "store"
    vectors, ids = write_clustered_store(store, N, D)
    roots = LocalRoots(index=root / "index", embed=root / "embed", ingest=root / "ingest")
    roots.embed.mkdir()
    scores = np.random.default_rng(0).random(N).astype(np.float32)
    for name, factory in FACTORIES.items():
        (roots.embed / name).symlink_to(store)  # an index's dataset defaults to its folder's name
        config = IndexConfig(factory=factory, tune_queries=50, train_size=1_000, use_gpu="never")
        build_tuned_index(vectors, ids, config, "enc", roots.index / name, progress=False)
        np.savez(roots.index / name / SCORES_FILE, ids=ids, scores=scores)
        indices = export_index(roots.index / name, roots.embed, roots.ingest, root / "served", name=name,
                               service_clip=service_clip)
    with running(indices) as service:
        yield roots, vectors, service


@pytest.mark.parametrize("name, settings", [
    ("flat", {}), ("ivfpq", {}), ("flat", {"index_fraction": 0.5, "score_quantile": 2, "score_quantiles": 3})],
    ids=["flat", "ivfpq-rerank", "flat-subset-quantile"])
def test_local_and_served_backends_return_the_same_neighbours(synthetic, name, settings):
    roots, vectors, service = synthetic
    local = open_backend(RetrievalConfig(**settings), roots, "enc", D).open(name)
    served = open_backend(RetrievalConfig(**settings, backend="served", served_url=service.url),
                          roots, "enc", D).open(name)
    queries = vectors[::97] + np.random.default_rng(1).normal(0, 0.05, (len(vectors[::97]), D)).astype(np.float32)
    local_ids, local_similarities, local_vectors = local.knn(queries, K)
    served_ids, served_similarities, served_vectors = served.knn(queries, K)
    np.testing.assert_array_equal(served_ids, local_ids)
    np.testing.assert_allclose(served_similarities, local_similarities, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(served_vectors, local_vectors)
    np.testing.assert_array_equal(served.scores(served_ids), local.scores(local_ids))
    assert served.sidecar["fingerprint"] == local.sidecar["fingerprint"] == "enc"


def _cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "knn_diffusion.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_generate_refuses_a_served_index_of_another_encoder(synthetic, tiny_pipeline, tmp_path):
    """The tiny pipeline's encoder asks the service for an index built with encoder 'enc': one error line."""
    _, _, service = synthetic
    done = _cli(tiny_pipeline, "generate", "a cat", "--index", "flat", "--set", "retrieval.backend=served",
                "--set", f"retrieval.served_url={service.url}", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: index 'flat' served by {service.url}: built from encoder fingerprint 'enc', "
                           "but the embeddings in use have "), line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def pipeline_served(tiny_pipeline, service_clip, tmp_path_factory) -> Path:
    """The tiny pipeline's indexes (openmoji, noto) written by the real ``knn-diffusion serve-export``."""
    out = tmp_path_factory.mktemp("served-pipeline") / "served"
    done = _cli(tiny_pipeline, "serve-export", "openmoji", "noto", "--out", str(out), "--service-clip", service_clip)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{out / 'indices.json'}\n")
    return out / "indices.json"


def test_the_pipeline_index_served_gives_the_local_neighbours_and_images(tiny_pipeline, pipeline_served,
                                                                         monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    from knn_diffusion.config import load_params
    from knn_diffusion.encoders.factory import load_encoder

    params = load_params("params.yaml", [])
    encoder = load_encoder(params.encoder, paths.ENCODER)
    queries = encoder.encode_texts(PROMPTS[:6])
    with running(pipeline_served) as service:
        for index in ("openmoji", "noto"):
            local = open_backend(RetrievalConfig(), paths.retrieval_roots(), encoder.fingerprint,
                                 encoder.dim).open(index)
            served = open_backend(RetrievalConfig(backend="served", served_url=service.url),
                                  paths.retrieval_roots(), encoder.fingerprint, encoder.dim).open(index)
            local_ids, _, local_vectors = local.knn(queries, 3)
            served_ids, _, served_vectors = served.knn(queries, 3)
            np.testing.assert_array_equal(served_ids, local_ids)
            np.testing.assert_array_equal(served_vectors, local_vectors)
            np.testing.assert_array_equal(served.images(served_ids[0]), local.images(local_ids[0]))


def test_a_service_killed_mid_sample_fails_the_stage_and_leaves_no_outputs(tiny_pipeline, pipeline_served, tmp_path):
    """sample@continuous over two served indexes and 16 prompts; the service is killed as it answers the first
    of the second index's 16 queries (the first index's images are written by then, in the stage's temporary
    folder): one error line, exit 2, no samples folder, no metrics file."""
    root = copy_outputs(tiny_pipeline, tmp_path / "repo", str(paths.model_dir("continuous")), str(paths.ENCODER))
    seen = {"/metadata": 0, "/knn-service": 0}
    killed = threading.Event()

    def kill_at_the_second_index_first_query(line: str) -> None:
        """werkzeug logs a request as it sends the answer's headers: killed then, the client never reads it."""
        match = re.search(r'"POST (/metadata|/knn-service) HTTP/1\.[01]" 200', line)
        if match is None or killed.is_set():
            return
        seen[match[1]] += 1
        if seen["/metadata"] == 2 and match[1] == "/knn-service":
            os.killpg(service.process.pid, signal.SIGKILL)
            killed.set()

    with running(pipeline_served, on_line=kill_at_the_second_index_first_query) as service:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["sample"].update({"prompts": PROMPTS, "indexes": ["openmoji", "noto"]})
        params["retrieval"] = {**params.get("retrieval", {}), "backend": "served", "served_url": service.url}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
        done = subprocess.run([sys.executable, "-m", "knn_diffusion.stages.sample", "--model", "continuous"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert killed.is_set(), f"the service was never killed ({seen}):\n{service.log()}\n{done.stderr[-3000:]}"
    assert f"openmoji index: {len(PROMPTS)} images" in done.stderr  # the first index was done: mid-sample
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    # the answer in flight is cut (ChunkedEncodingError), or the kill came first (ConnectionError)
    assert re.fullmatch(rf"error: retrieval\.served_url={re.escape(service.url)}: /knn-service got no answer "
                        r"\((ConnectionError|ChunkedEncodingError)\); is `clip-retrieval back` running there\?", error)
    assert done.stderr.strip().splitlines()[-1] == error
    samples = root / paths.SAMPLES
    left = sorted(str(p.relative_to(root)) for p in samples.rglob("*")) if samples.exists() else []
    assert left == [] and not (root / paths.sample_metrics("continuous")).exists(), left


@pytest.fixture(scope="module")
def evaluate_pipeline(tmp_path_factory, service_clip) -> Path:
    """tests/test_evaluate_stage.py's miniature (tiny pretrained encoder and judge, three grid points) up to
    training, in an MLflow experiment of its own, with its openmoji index exported by ``serve-export``."""
    from knn_diffusion.stages import embed, encoder, index, ingest, judge, knn, train_continuous
    from tests.continuous_helpers import write_micro_preset
    from tests.test_evaluate_stage import TINY as EVALUATE_TINY
    from tests.test_evaluate_stage import tiny_pretrained_clip

    root = tmp_path_factory.mktemp("served-evaluate")
    train = {**EVALUATE_TINY["train_continuous"], "preset": write_micro_preset(root)}
    (root / "params.yaml").write_text(yaml.safe_dump({
        **EVALUATE_TINY, "encoder": tiny_pretrained_clip(root), "judge": tiny_pretrained_clip(root, seed=1),
        "train_continuous": train, "tracking": {"experiment": "served-evaluate"}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (ingest, encoder, judge, embed, index, knn, train_continuous):
            stage.main([])
    done = _cli(root, "serve-export", "openmoji", "--out", str(root / "served"), "--service-clip", service_clip)
    assert done.returncode == 0, done.stderr
    return root


def test_a_service_killed_mid_evaluation_fails_the_stage_and_leaves_no_outputs(evaluate_pipeline):
    """evaluate@continuous against the served index; the service is killed as soon as the stage has scored
    and logged its first kNN grid point (k2-frac0.5): one error line, exit 2, no evaluate folder or metrics."""
    root = evaluate_pipeline
    lines: list[str] = []
    with running(root / "served" / "indices.json") as service:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["retrieval"] = {"backend": "served", "served_url": service.url}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
        stage = subprocess.Popen([sys.executable, "-m", "knn_diffusion.stages.evaluate", "--model", "continuous"],
                                 cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        try:
            for line in stage.stderr:
                lines.append(line.rstrip())
                if "INFO k2-frac0.5-g3-openmoji: " in line and service.process.poll() is None:
                    os.killpg(service.process.pid, signal.SIGKILL)
            stage.wait(timeout=600)
        finally:
            if stage.poll() is None:
                os.killpg(stage.pid, signal.SIGKILL)
                stage.wait()
        killed = service.process.poll() == -signal.SIGKILL
    stderr = "\n".join(lines)
    assert killed, f"the stage never logged its first kNN point:\n{stderr[-3000:]}"
    assert stage.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    (error,) = [line for line in lines if line.startswith("error:")]
    assert re.fullmatch(rf"error: retrieval\.served_url={re.escape(service.url)}: /(indices-list|metadata|knn-service) "
                        r"got no answer \((ConnectionError|ChunkedEncodingError)\); is `clip-retrieval back` running "
                        r"there\?", error), error
    assert stderr.strip().splitlines()[-1] == error
    folder = root / paths.evaluate_dir("continuous")
    left = sorted(str(p.relative_to(root)) for p in folder.parent.rglob("*")) if folder.parent.exists() else []
    assert left == [] and not (root / paths.evaluate_metrics("continuous")).exists(), left
