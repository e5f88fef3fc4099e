"""Stage processes pin torch's thread count: runtime.threads, else their share of the cores the flows give
them (cores / processes side by side)."""

from __future__ import annotations

import os

import torch

from flows.dvc_cli import stage_env
from knn_diffusion.stages.common import THREADS_ENV, pin_threads, threads_per_process, usable_cores


def test_processes_side_by_side_share_the_budget(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "8")  # an exported OMP_NUM_THREADS is the whole run's budget
    assert [threads_per_process(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert stage_env(side_by_side=2)[THREADS_ENV] == "4"
    monkeypatch.delenv(THREADS_ENV)
    assert threads_per_process() == usable_cores()
    assert stage_env(side_by_side=usable_cores() * 2)[THREADS_ENV] == "1"


def test_a_stage_pins_the_params_count_or_its_share(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "2")
        assert pin_threads(0) == 2 and torch.get_num_threads() == 2  # 0: what the flow gave this process
        assert pin_threads(3) == 3 and torch.get_num_threads() == 3  # runtime.threads wins
        assert os.environ[THREADS_ENV] == "3"  # for the processes it starts (torchrun ranks, Dask workers)
    finally:
        torch.set_num_threads(before)
