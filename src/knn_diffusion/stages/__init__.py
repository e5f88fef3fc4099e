"""DVC stages: one thin CLI module per stage (``python -m knn_diffusion.stages.<name>``).

Each reads params.yaml through the typed schema, calls library functions, writes its outs
atomically and logs one MLflow run. Output paths are defined once, in :mod:`.paths`.
"""
