"""Sweep planning without DVC or MLflow: which trials a rerun skips, waits for or runs, from what DVC and
MLflow report; and the trial names the grid gets."""

from __future__ import annotations

import os
import subprocess

import pytest

from flows.sweep_plan import SweepBusy, expand_grid, experiment_name, plan_trials, trials_of, with_overrides
from flows.sweep_queue import DeadTasks
from tests.conftest import REPO

PARAMS = {"train_continuous": {"k": 10, "lr": 0.001}, "data": {"resolution": 32}}
COMBOS = {"s-k-1": ["train_continuous.k=1"]}
LIVE, DEAD = 101, 202


def alive(pid):
    return pid == LIVE


def committed(overrides=("train_continuous.k=1",)):
    """What DVC reports of an experiment that succeeded with these overrides."""
    return {"succeeded": True, "running": None, "params": with_overrides(PARAMS, list(overrides))}


def running(pid):
    return {"succeeded": False, "running": {"pid": pid, "root": "/repo/.dvc/tmp/exps/tmpabc"}}


def plan(known, previous):
    return plan_trials(COMBOS, PARAMS, known, previous, alive)


def test_a_finished_trial_whose_experiment_succeeded_is_done():
    assert plan({"s-k-1": committed()}, {"s-k-1": "FINISHED"}).done == ["s-k-1"]


def test_a_trial_left_running_by_a_dead_sweep_is_done_once_its_experiment_succeeded():
    assert plan({"s-k-1": committed()}, {"s-k-1": "RUNNING"}).done == ["s-k-1"]


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_a_failed_or_killed_trial_runs_again_even_when_an_experiment_of_its_name_succeeded(status):
    planned = plan({"s-k-1": committed()}, {"s-k-1": status})
    assert planned.done == [] and planned.to_run == {"s-k-1": None}


def test_a_trial_never_started_runs():
    planned = plan({}, {})
    assert (planned.done, planned.live, planned.to_run) == ([], [], {"s-k-1": None})


def test_an_experiment_of_the_same_name_from_another_sweep_does_not_count():
    assert plan({"s-k-1": committed()}, {}).to_run == {"s-k-1": None}  # no trial run in the sweep resumed


def test_changed_params_run_again():
    changed = {**PARAMS, "train_continuous": {"k": 10, "lr": 0.01}}  # params.yaml edited since
    planned = plan_trials(COMBOS, changed, {"s-k-1": committed()}, {"s-k-1": "FINISHED"}, alive)
    assert planned.to_run == {"s-k-1": None}
    other_value = plan({"s-k-1": committed(["train_continuous.k=2"])}, {"s-k-1": "FINISHED"})
    assert other_value.to_run == {"s-k-1": None}


def test_a_running_trial_on_a_live_worker_is_waited_for():
    planned = plan({"s-k-1": running(LIVE)}, {"s-k-1": "RUNNING"})
    assert (planned.live, planned.to_run) == (["s-k-1"], {})


def test_a_running_trial_on_a_dead_worker_runs_again_after_its_task_is_cleared():
    dead = running(DEAD)
    planned = plan({"s-k-1": dead}, {"s-k-1": "RUNNING"})
    assert planned.to_run == {"s-k-1": dead["running"]}  # handed to queue_experiment, which kills it first


def test_an_experiment_a_live_process_outside_the_sweep_runs_is_refused():
    with pytest.raises(SweepBusy, match="being run by another process"):
        plan({"s-k-1": running(LIVE)}, {})


def test_names_keep_the_keys_last_part_and_the_whole_value():
    assert experiment_name("sweep", ["retrieval.index_fraction=0.5"]) == "sweep-index_fraction-0.5"
    assert experiment_name("g", ["sample.continuous.guidance=1.0", "train_continuous.k=-1"]) == "g-guidance-1.0-k--1"
    assert experiment_name("s", ["evaluate.grid.k=[1, 10]"]) == "s-k-1,10"
    assert experiment_name("res", ["data.resolution=16"]) == "res-resolution-16"


def test_float_negative_and_list_values_make_distinct_valid_trials():
    grid = expand_grid(["sample.continuous.guidance=1.0,3.0", "evaluate.grid.k=[1,10],[5]", "+",
                        "train_continuous.k=-1"])
    assert grid == [["sample.continuous.guidance=1.0", "evaluate.grid.k=[1,10]"],
                    ["sample.continuous.guidance=1.0", "evaluate.grid.k=[5]"],
                    ["sample.continuous.guidance=3.0", "evaluate.grid.k=[1,10]"],
                    ["sample.continuous.guidance=3.0", "evaluate.grid.k=[5]"], ["train_continuous.k=-1"]]
    names = [experiment_name("s", combo) for combo in grid]
    assert len(set(names)) == len(names)
    for name in names:  # DVC names an experiment by a git ref: git must accept it
        subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"], check=True)
    assert with_overrides(PARAMS, grid[0])["sample"]["continuous"]["guidance"] == 1.0
    assert with_overrides(PARAMS, grid[0])["evaluate"]["grid"]["k"] == [1, 10]
    assert PARAMS["train_continuous"]["k"] == 10  # not changed in place


def test_float_values_of_one_key_are_separate_trials():
    combos, _ = trials_of(["sample.continuous.guidance=1.0,3.0"], REPO, "g")
    assert list(combos) == ["g-guidance-1.0", "g-guidance-3.0"]


def exited_pid() -> int:
    """The pid of a real process that has ended and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_task_is_dead_only_when_its_process_is_gone_at_two_checks_in_a_row():
    """DVC says "Running" for a few seconds after an experiment's process ends, while its worker collects the
    result: one check that finds no process must not kill the task and delete its working copy."""
    gone = {"pid": exited_pid(), "root": "/repo/.dvc/tmp/exps/tmpabc"}
    live = {"pid": os.getpid(), "root": "/repo/.dvc/tmp/exps/tmpdef"}
    watch = DeadTasks()
    assert watch.confirm({"s-k-1": gone, "s-k-2": live}) == {}
    assert watch.confirm({"s-k-1": gone, "s-k-2": live}) == {"s-k-1": gone}
    assert watch.confirm({"s-k-1": gone}) == {}  # counted once: a second kill would need two more misses


def test_a_task_that_finished_between_checks_is_never_called_dead():
    watch = DeadTasks()
    assert watch.confirm({"s-k-1": {"pid": exited_pid(), "root": None}}) == {}
    assert watch.confirm({}) == {}  # its worker marked it done: no longer reported running
    assert watch.suspects == set()
