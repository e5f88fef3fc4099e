"""The team stack without containers: the servers of docker/compose.yaml as local processes on loopback,
for `knn-diffusion stack`, the tests and the benchmarks. Servers are started as subprocesses; nothing
here imports Prefect or DVC."""
