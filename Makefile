# The two commands a newcomer needs: `make demo` and `make test` (both run setup first).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup served-venv demo test test-slow test-stack lock gpu-preset clean-outputs repro dvc study study-gpu study-doc defaults

setup:
	bash scripts/setup.sh

# LAION's kNN service (clip-retrieval back, for retrieval.backend=served) in its own venv, .venv-served, from
# services/clip-retrieval/requirements.lock (its pins clash with .venv's). 6.4 GB, installed by uv (seconds with
# its cache warm), nothing when the venv matches the lock.
served-venv:
	bash scripts/setup-served.sh

# Independent stages two at a time, one thread each (flows/pipeline.py run_side_by_side): the demo's critical path
# (ingest, encoder, embed, index, knn, train_continuous, evaluate) with the rest beside it. DEMO_PARALLEL=1: in turn.
DEMO_PARALLEL ?= 2
demo: setup
	$(PY) -m flows.pipeline --parallel-stages $(DEMO_PARALLEL)

test: setup
	$(PY) -m pytest -q

# The paper's ablations as one resumable sweep (flows/sweep_presets.py; rerun after a kill: only the missing
# trials run), then docs/study.md from its MLflow runs. study-gpu: the same study at 64 px for a GPU worker.
# Two trials side by side, one thread each: 1.6x the throughput of one trial with both threads on 2 cores
# (docs/benchmarks.md, "Threads per stage process"); STUDY_PARALLEL=N for N workers.
STUDY_PARALLEL ?= 2
study: setup
	$(PY) -m flows.pipeline --parallel-stages $(DEMO_PARALLEL)
	$(PY) -m flows.sweep --preset study --parallel $(STUDY_PARALLEL)
	$(PY) -m flows.study_doc --prefix study

study-gpu: setup
	$(PY) -m flows.sweep --preset study-gpu
	$(PY) -m flows.study_doc --prefix study-gpu --out docs/study-gpu.md

study-doc:
	$(PY) -m flows.study_doc --prefix study

# The paper's explicit settings (lambda 8, VQ-Diffusion's auxiliary weight and importance sampling) against
# today's defaults on the val split, as a sweep; docs/defaults.md from its runs.
defaults: setup
	$(PY) -m flows.sweep --preset defaults
	$(PY) -m flows.defaults_doc --prefix defaults

# DVC runs each stage's `python -m ...` with the first `python` on PATH; this Makefile puts the venv's
# first (export PATH above). `make repro ARGS=train_continuous`, `make dvc ARGS="exp run -S data.resolution=64"`.
repro:
	$(VENV)/bin/dvc repro $(ARGS)

dvc:
	$(VENV)/bin/dvc $(ARGS)

# The slow tier (CI runs it after `make test`): sweeps through DVC's queue, work-pool deployments, the
# Postgres/S3 tracking server, the cross-clone rollback, fresh venvs from the lock and retrieval.backend=served
# against a live clip-retrieval back (tests/test_served_live.py, from .venv-served). Exit 5 = none collected.
test-slow: setup served-venv
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

# docker/compose.yaml built and started under docker or podman, a pipeline deployment run through it
# (tests/test_container_stack.py; the first run downloads a wheelhouse and builds the image).
test-stack:
	KNN_SETUP_CONTAINERS=1 bash scripts/setup.sh
	$(PY) -m pytest -q -s -m stack tests/test_container_stack.py

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^knn-diffusion' | \
	  (echo '# Exact versions for the project venv (Python 3.11, x86_64). Regenerate with: make lock'; cat) > requirements.lock

gpu-preset: setup
	$(PY) -m knn_diffusion.cli params --preset gpu
