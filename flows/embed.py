"""Embed shards in parallel on a Dask cluster through Prefect (a LocalCluster here, any scheduler address
on a real deployment). The embed stage calls this only when ``embed.workers > 0``.

The shard work itself is the library's :func:`knn_diffusion.encoders.store.write_shard`; each task
loads the encoder and opens the image store itself, so only paths travel between processes.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner


@task(cache_policy=NO_CACHE, retries=1, task_run_name="embed shard {shard}")
def embed_shard(params: dict, aligned_dir: str, images_dir: str, out_dir: str, shard: int) -> int:
    import torch

    from knn_diffusion.config import build_params
    from knn_diffusion.data.store import ImageStore
    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.encoders.store import write_shard

    torch.set_num_threads(1)  # one thread per Dask worker process
    cfg = build_params(params)
    encoder = load_encoder(cfg.encoder, aligned_dir)
    images = ImageStore.open(images_dir)
    write_shard(encoder, images, images.rows(), out_dir, shard, cfg.embed.shard_size,
                cfg.embed.batch_size, cfg.embed.dtype.value)
    return shard


def embed_shards_parallel(params: dict, aligned_dir: str, images_dir: str, out_dir: str, shards: list[int],
                          workers: int, address: str = "") -> list[int]:
    """Run :func:`embed_shard` for ``shards`` on ``workers`` local processes or the cluster at ``address``.

    ``params`` is the validated params as plain data, so workers see the same overrides.
    """
    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})

    @flow(name="embed-shards", task_runner=runner)
    def run() -> list[int]:
        futures = [embed_shard.submit(params, aligned_dir, images_dir, out_dir, s) for s in shards]
        return [f.result() for f in futures]

    return run()
