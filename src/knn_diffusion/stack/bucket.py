"""The stack's bucket across `down` and `up`: moto's S3 server keeps objects in memory, so `down` copies
the bucket into the data directory and `up` puts it back (MinIO, in the compose stack, keeps them itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

from knn_diffusion.stack.services import s3_client, s3_keys


def snapshot_bucket(endpoint: str, bucket: str, folder: Path) -> int:
    """Replace ``folder/bucket`` with the bucket's objects; returns how many."""
    target, partial = folder / bucket, folder / f"{bucket}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    client = s3_client(endpoint)
    keys = s3_keys(endpoint, bucket)
    for key in keys:
        path = partial / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
    partial.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # the previous snapshot is replaced only by a complete one
    return len(keys)


def restore_bucket(endpoint: str, bucket: str, folder: Path) -> int:
    """Create ``bucket`` and upload the snapshot in ``folder/bucket`` (if any); returns how many objects."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    source = folder / bucket
    files = [p for p in source.rglob("*") if p.is_file()] if source.is_dir() else []
    for path in files:
        client.upload_file(str(path), bucket, path.relative_to(source).as_posix())
    return len(files)
