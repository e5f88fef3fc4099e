"""Embed shards in parallel on a Dask cluster: local worker processes, or any scheduler address.

Each task loads the encoder and opens the image store itself, so only paths and the encoder's
settings travel between processes; the shard work is :func:`knn_diffusion.encoders.store.write_shard`,
whose bytes do not depend on which worker ran it or in what order.
"""

from __future__ import annotations

import os
from functools import partial

from knn_diffusion.encoders.config import EncoderConfig


def embed_shard(encoder_cfg: EncoderConfig, aligned_dir: str, images_dir: str, out_dir: str, shard: int,
                shard_size: int, batch_size: int, dtype: str) -> int:
    import torch

    from knn_diffusion.data.store import ImageStore
    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.encoders.store import write_shard

    torch.set_num_threads(1)  # one thread per Dask worker process
    encoder = load_encoder(encoder_cfg, aligned_dir)
    images = ImageStore.open(images_dir)
    write_shard(encoder, images, images.rows(), out_dir, shard, shard_size, batch_size, dtype)
    return shard


def embed_shards_parallel(encoder_cfg: EncoderConfig, aligned_dir: str | os.PathLike, images_dir: str | os.PathLike,
                          out_dir: str | os.PathLike, shards: list[int], *, shard_size: int, batch_size: int,
                          dtype: str, workers: int, address: str = "") -> list[int]:
    """Run :func:`embed_shard` for ``shards`` on ``workers`` local processes, or on the cluster at ``address``."""
    from dask.distributed import Client, LocalCluster

    cluster = None if address else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None)
    try:
        with Client(address or cluster) as client:
            # partial, not map's **kwargs: Client.map has a batch_size of its own
            task = partial(embed_shard, encoder_cfg, str(aligned_dir), str(images_dir), str(out_dir),
                           shard_size=shard_size, batch_size=batch_size, dtype=dtype)
            futures = client.map(task, shards, pure=False, retries=1)
            return client.gather(futures)
    finally:
        if cluster is not None:
            cluster.close()
