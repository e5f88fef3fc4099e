"""Every stage output path, in one place (dvc.yaml names the same paths; a test checks they agree)."""

from pathlib import Path

DATA = Path("data")
INGEST = DATA / "ingest"
METRICS = Path("metrics")
INGEST_METRICS = METRICS / "ingest.json"


def dataset_dir(name: str) -> Path:
    return INGEST / name
