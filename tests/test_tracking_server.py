"""A pipeline run logged to a real MLflow tracking server: Postgres backend store, S3 artifact store.

The S3 endpoint is moto's server mode (plain S3 over HTTP, as MinIO speaks it): no MinIO binary
installs from the registries this project may use, and the compose stack runs the real MinIO.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from knn_diffusion.stack.services import mlflow_server, postgres, s3_keys, s3_server
from tests import dvc_repo

# Starts Postgres, an S3 server and mlflow server (~30 s): the slow tier.
pytestmark = pytest.mark.slow

BUCKET = "knn-diffusion"


def test_pipeline_run_lands_on_a_postgres_and_s3_tracking_server(tmp_path):
    repo = dvc_repo.make_repo(tmp_path / "repo", dvc_repo.tiny_params(dvc_repo.tiny_open_clip(tmp_path), "team"),
                              stages=("ingest",))  # one stage with an artifact: stages are tested elsewhere
    with postgres() as database, s3_server(tmp_path, BUCKET) as s3, \
            mlflow_server(tmp_path, database, f"s3://{BUCKET}/mlflow", s3) as uri:
        env = {**dvc_repo.env(repo), "MLFLOW_TRACKING_URI": uri}
        done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(repo)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("team")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert "ingest" in runs and runs["ingest"].info.status == "FINISHED"
        assert runs["ingest"].data.metrics["openmoji.images"] > 0
        # Artifacts go through the server into the bucket.
        logged = [a.path for a in client.list_artifacts(runs["ingest"].info.run_id, "samples")]
        assert "samples/openmoji.png" in logged
        keys = s3_keys(s3, BUCKET, "mlflow/")
        assert any(key.endswith(f"{runs['ingest'].info.run_id}/artifacts/samples/openmoji.png") for key in keys), keys
