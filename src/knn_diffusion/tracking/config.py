"""Params section ``tracking``: where every stage's MLflow run goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from knn_diffusion.config_fields import between


@dataclass
class TrackingConfig:
    experiment: str = "knn-diffusion"
    # Empty: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    tracking_uri: str = ""
    sample_grid_size: int = field(default=64, metadata=between(1, 1024))
