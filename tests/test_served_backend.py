"""retrieval.backend=served against the real LAION kNN service, ``clip-retrieval back``, started from its own venv
(``.venv-served``, made by ``KNN_SETUP_SERVED=1 bash scripts/setup.sh``; ``make test-slow`` does) on a loopback
port, and stopped after: the same neighbours as the local backend, the fingerprint check, and a service that
goes down in the middle of an evaluate run."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from knn_diffusion.cli import main as cli_main
from knn_diffusion.config import load_params
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.encoders.store import begin_embedding, emb_name, finish_embedding, ids_name
from knn_diffusion.io import read_json, save_npy, write_json
from knn_diffusion.retrieval.backends import LocalRoots, open_backend
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig, RetrievalConfig
from knn_diffusion.retrieval.inference import SCORES_FILE
from knn_diffusion.retrieval.served_export import export_index
from knn_diffusion.retrieval.synthetic import clustered_vectors
from knn_diffusion.stages import evaluate, paths
from tests.conftest import REPO, copy_outputs

pytestmark = pytest.mark.slow

SERVED_VENV = Path(os.environ.get("KNN_SERVED_VENV", REPO / ".venv-served"))
SERVICE = SERVED_VENV / "bin" / "clip-retrieval"
# The untrained CLIP scripts/setup_served.sh writes for the service to load offline (our queries are embeddings).
SERVICE_CLIP = f"open_clip:ViT-S-32-alt/{SERVED_VENV.resolve() / 'service-clip-ViT-S-32-alt.pt'}"
SYNTHETIC = {"flat": "Flat", "ivf": "IVF16,PQ16x4fs,Refine(SQfp16)"}
N, D = 2_000, 32
EVALUATE = ["evaluate.count=4", "evaluate.batch_size=4", "evaluate.kid_subsets=2", "evaluate.kid_subset_size=2",
            "evaluate.r_precision_candidates=2", "evaluate.grid_prompts=2", "evaluate.grid.k=[2]",
            "evaluate.grid.index_fraction=[0.5,1.0]", "evaluate.grid.score_quantile=[0,2]",
            "retrieval.score_quantiles=2", "evaluate.continuous.steps=2", "evaluate.judge=retrieval_encoder"]


def start_service(indices: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``clip-retrieval back`` on a free port, once it answers (its start-up imports torch and loads a CLIP)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "wb") as out:
        process = subprocess.Popen([str(SERVICE), "back", "--indices_paths", str(indices), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"clip-retrieval back exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/indices-list", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop_service(process)
    pytest.fail(f"clip-retrieval back did not answer within 300 s:\n{log.read_text()[-3000:]}")


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def synthetic_index(root: Path, name: str, factory: str) -> None:
    """An embedding store of N clustered vectors (ids not 0..N-1), its index and a score column, as the stages lay
    them out (``<root>/embed/<name>``, ``<root>/index/<name>``)."""
    vectors = clustered_vectors(N, D, n_clusters=20, seed=3)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    store = root / "embed" / name
    for shard in begin_embedding(store, "enc", D, ids, 1_000, "float32"):
        save_npy(store / emb_name(shard), vectors[shard * 1_000:(shard + 1) * 1_000])
        save_npy(store / ids_name(shard), ids[shard * 1_000:(shard + 1) * 1_000])
    finish_embedding(store)
    config = IndexConfig(factory=factory, tune_queries=50, train_size=1_000, use_gpu="never")
    build_tuned_index(vectors, ids, config, "enc", root / "index" / name, progress=False)
    np.savez(root / "index" / name / SCORES_FILE, ids=ids, scores=np.random.default_rng(0).random(N).astype(np.float32))


@pytest.fixture(scope="module")
def repo(tiny_pipeline, tmp_path_factory):
    """A copy of the tiny pipeline, with a synthetic Flat and IVF index beside its own, and an index built by
    another encoder ('foreign': the tiny index with another fingerprint), all exported for the service."""
    if not SERVICE.exists():
        pytest.skip(f"no {SERVICE}: create the service's venv with KNN_SETUP_SERVED=1 bash scripts/setup.sh "
                    "(make test-slow does)")
    root = copy_outputs(tiny_pipeline, tmp_path_factory.mktemp("served") / "repo", str(paths.INGEST),
                        str(paths.EMBED), str(paths.INDEX), str(paths.ENCODER), "models")
    synthetic = root.parent / "synthetic"
    for name, factory in SYNTHETIC.items():
        synthetic_index(synthetic, name, factory)
        export_index(synthetic / "index" / name, synthetic / "embed", synthetic / "ingest", root / "served",
                     service_clip=SERVICE_CLIP)
    foreign = root.parent / "foreign"
    shutil.copytree(root / paths.index_dir("openmoji"), foreign)
    write_json(foreign / "index.json", {**read_json(foreign / "index.json"), "fingerprint": "another-encoder"})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli_main(["serve-export", "openmoji", "--out", "served", "--service-clip", SERVICE_CLIP])
        export_index(foreign, paths.EMBED, paths.INGEST, "served", name="foreign", service_clip=SERVICE_CLIP)
    return root


@pytest.fixture(scope="module")
def service(repo):
    process, url = start_service(repo / "served" / "indices.json", repo.parent / "service.log")
    yield url
    stop_service(process)


def test_local_and_served_backends_return_the_same_neighbours(repo, service):
    """Same content ids, similarities, embeddings, scores, images and recorded index facts, query by query:
    for a Flat and an IVF-PQ + re-rank index, over the full index, a 50% subset and a per-query score quantile."""
    synthetic = repo.parent / "synthetic"
    roots = LocalRoots(index=synthetic / "index", embed=synthetic / "embed", ingest=synthetic / "ingest")
    queries = clustered_vectors(N, D, n_clusters=20, seed=3)[::40] + 0.05  # 50 queries near the data
    settings = [{}, {"score_quantile": 2, "score_quantiles": 3}, {"index_fraction": 0.5}]
    compared = 0
    for name in SYNTHETIC:
        for change in settings if name == "flat" else settings[:2]:  # see README: subsets post-filter on IVF
            retrieval = RetrievalConfig(**change)
            local = open_backend(retrieval, roots, "enc", D).open(name)
            served = open_backend(dataclasses.replace(retrieval, backend="served", served_url=service),
                                  roots, "enc", D).open(name)
            local_ids, local_similarities, local_vectors = local.knn(queries, 5)
            served_ids, served_similarities, served_vectors = served.knn(queries, 5)
            np.testing.assert_array_equal(served_ids, local_ids, err_msg=f"{name} {change}")
            np.testing.assert_allclose(served_similarities, local_similarities, atol=1e-5)
            np.testing.assert_array_equal(served_vectors, local_vectors)
            np.testing.assert_array_equal(served.scores(served_ids), local.scores(local_ids))
            for key in ("sha256", "fingerprint", "index_fraction", "subset_seed", "score_quantile"):
                assert served.sidecar[key] == local.sidecar[key], key
            compared += served_ids.size
    assert compared == 5 * 50 * 5

    # the images the retrieval baseline reads: the tiny pipeline's index, with its ingested images
    at = load_params(str(repo / "params.yaml"))
    encoder = load_encoder(at.encoder, repo / paths.ENCODER)
    prompts = encoder.encode_texts(["an emoji of a red heart", "an emoji of a cat", "a grinning face", "a tree"])
    tiny = LocalRoots(index=repo / paths.INDEX, embed=repo / paths.EMBED, ingest=repo / paths.INGEST)
    local = open_backend(RetrievalConfig(), tiny, encoder.fingerprint, encoder.dim).open("openmoji")
    served = open_backend(RetrievalConfig(backend="served", served_url=service), tiny, encoder.fingerprint,
                          encoder.dim).open("openmoji")
    (local_ids, _, _), (served_ids, _, _) = local.knn(prompts, 3), served.knn(prompts, 3)
    np.testing.assert_array_equal(served_ids, local_ids)
    np.testing.assert_array_equal(served.images(served_ids[:, 0]), local.images(local_ids[:, 0]))


def test_each_backend_refuses_an_index_of_another_encoder_with_one_error_line(repo, service, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    for backend in (["--index", "foreign", "--set", "retrieval.backend=served", "--set",
                     f"retrieval.served_url={service}"], ["--index", str(repo.parent / "foreign")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["generate", "an emoji of a cat", "--out", str(repo / "out"), *backend])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert "built from encoder fingerprint 'another-encoder'" in err, err
        assert not (repo / "out").exists()


def test_evaluate_gives_the_same_points_with_either_backend(repo, service, tmp_path, monkeypatch):
    """The evaluate stage's grid (subset, score-quantile and baseline points) over the served index writes the
    same table and images as over the local one."""
    outputs = {}
    for backend in ("local", "served"):
        root = copy_outputs(repo, tmp_path / backend, str(paths.INGEST), str(paths.EMBED), str(paths.INDEX),
                            str(paths.ENCODER), "models")
        monkeypatch.chdir(root)
        evaluate.main([*EVALUATE, f"retrieval.backend={backend}", f"retrieval.served_url={service}"])
        out = root / paths.evaluate_dir("continuous")
        outputs[backend] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}
        outputs[backend]["points.csv"] = (out / "points.csv").read_bytes()
    assert outputs["served"].keys() == outputs["local"].keys()
    assert outputs["served"] == outputs["local"]


def test_a_service_that_goes_down_mid_evaluation_fails_the_stage_and_leaves_no_outputs(repo, tmp_path, capsys,
                                                                                     monkeypatch):
    """The service is stopped as soon as it has answered the first grid point's first query: the stage ends
    with one error line naming the service, and writes neither its outputs folder nor its metrics."""
    process, url = start_service(repo / "served" / "indices.json", tmp_path / "service.log")

    def stop_after_first_answer():
        while process.poll() is None:
            try:
                answered = re.search(r"^full_knn_request_time_count (\S+)$", requests.get(f"{url}/metrics").text, re.M)
            except requests.ConnectionError:
                return
            if answered and float(answered.group(1)) >= 1:
                stop_service(process)
            time.sleep(0.05)

    root = copy_outputs(repo, tmp_path / "down", str(paths.INGEST), str(paths.EMBED), str(paths.INDEX),
                        str(paths.ENCODER), "models")
    monkeypatch.chdir(root)
    watcher = threading.Thread(target=stop_after_first_answer, daemon=True)
    watcher.start()
    try:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*EVALUATE, "retrieval.backend=served", f"retrieval.served_url={url}"])
    finally:
        stop_service(process)
        watcher.join(30)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: retrieval.served_url={url}: ") and "clip-retrieval back" in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)
    assert not (root / paths.evaluate_dir("continuous")).exists()
    assert not list((root / paths.evaluate_dir("continuous")).parent.glob(".continuous.*"))  # no temporary left
    assert not (root / paths.evaluate_metrics("continuous")).exists()
