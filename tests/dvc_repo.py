"""A scratch git+DVC repository holding this project's stages and tiny params, run with the real ``dvc``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
PIPELINE = ("ingest", "encoder", "judge", "embed", "index", "knn", "train_continuous", "manipulation_pairs",
            "train_manipulation",
            "tokenizer", "train_discrete", "sample", "evaluate", "evaluate_manipulation", "human_eval",
            "human_eval_manipulation", "human_eval_aggregate", "human_eval_aggregate_manipulation")
# The DVC stages those entries of dvc.yaml make (a matrix entry is one stage per item), each traced.
TRACED = ("ingest", "encoder", "judge", "embed", "index", "knn", "train_continuous", "manipulation_pairs",
          "train_manipulation", "tokenizer", "train_discrete", "sample@continuous", "sample@discrete",
          "evaluate@continuous", "evaluate@discrete", "evaluate_manipulation", "human_eval", "human_eval_manipulation",
          "human_eval_aggregate", "human_eval_aggregate_manipulation")
TRACES = ".traces"  # in the repo root (git-ignored): a copy of a traced repo writes its own traces


def tiny_open_clip(folder: Path) -> tuple[str, str]:
    """(architecture json, weights file) of a tiny randomly initialised open_clip: a fixed encoder."""
    import torch
    from safetensors.torch import save_file

    from knn_diffusion.encoders.factory import load_open_clip

    arch = folder / "tiny-dvc-clip.json"
    arch.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    torch.manual_seed(0)
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in load_open_clip(str(arch)).model.state_dict().items()}, weights)
    return str(arch), str(weights)


def tiny_params(encoder: tuple[str, str], experiment: str) -> dict:
    """The project's params.yaml shrunk to seconds per stage (one dataset, a fixed tiny encoder)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"] = {"openmoji": {"source": "openmoji", "limit": 60}}
    params["encoder"].update({"kind": "open_clip", "model_name": encoder[0], "pretrained": encoder[1]})
    params["judge"].update({"kind": "open_clip", "model_name": encoder[0], "pretrained": encoder[1]})
    params["embed"]["shard_size"] = 25
    params["index"]["tune_queries"] = 20
    params["knn"]["k_max"] = 4
    for backbone in ("train_continuous", "train_discrete"):  # every backbone's k must fit in k_max
        if backbone in params:
            params[backbone]["k"] = 3
    params["train_continuous"].update({"batch_size": 4, "max_steps": 2, "warmup_steps": 1,
                                       "checkpoint_every": 2, "sample_every": 0, "log_every": 1})
    params["train_continuous"]["sampling"]["steps"] = 2
    params["tokenizer"].update({"steps": 2, "batch_size": 8, "log_every": 1})
    params["tokenizer"]["vq"].update({"block_out_channels": [8, 16, 16], "codebook_size": 32, "embed_dim": 4})
    params["train_discrete"].update({"batch_size": 4, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                     "log_every": 1})
    params["train_discrete"]["sampling"]["steps"] = 2
    params["sample"].update({"prompts": ["an emoji of a red heart", "an emoji of a cat"], "indexes": ["openmoji"]})
    params["sample"]["continuous"]["steps"] = params["sample"]["discrete"]["steps"] = 2
    # Two grid points (no kNN, k=3) and the retrieval baseline on four test-split captions.
    params["evaluate"].update({"count": 4, "batch_size": 4, "kid_subsets": 2, "kid_subset_size": 2,
                               "r_precision_candidates": 2, "grid_prompts": 2,
                               "grid": {"k": [0, 3], "index_fraction": [1.0], "index": ["openmoji"]}})
    params["evaluate"]["continuous"].update({"steps": 2, "guidance": [3.0]})
    params["evaluate"]["discrete"].update({"steps": 2, "guidance": [8.0]})
    params["human_eval"].update({"system_a": "outputs/evaluate/continuous/k3-frac1-g3-openmoji",
                                 "system_b": "outputs/evaluate/continuous/retrieval_baseline", "screenshot": False})
    params["manipulation_pairs"]["min_correlation"] = -1.0  # a random tiny encoder's neighbours: keep what converges
    params["train_manipulation"].update({"batch_size": 4, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                         "log_every": 1})
    params["train_manipulation"]["sampling"]["steps"] = params["edit"]["steps"] = 2
    params["evaluate_manipulation"].update({"images": 2, "grid_rows": 2})
    params["human_eval_manipulation"]["screenshot"] = False
    params["tracking"]["experiment"] = experiment
    return params


def make_repo(root: Path, params: dict, stages: tuple[str, ...] = PIPELINE, traced: bool = False) -> Path:
    """git init + dvc init in ``root`` with the project's src, its dvc.yaml limited to ``stages``, ``params``.

    With ``traced``, each stage runs under ``stage_tracer.py``, which writes ``.traces/<stage>.json`` (a matrix
    stage's items: ``.traces/<stage>@<item>.json``, DVC's names) relative to the repo root.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"] = {name: spec["stages"][name] for name in stages}
    if traced:
        (root / TRACES).mkdir()
        (root / ".gitignore").write_text(f"/{TRACES}/\n")
        for name, stage in spec["stages"].items():
            module, *args = stage["cmd"].split(" -m ")[1].split()
            item = "@" + "-".join(f"${{item.{key}}}" for key in stage["matrix"]) if "matrix" in stage else ""
            stage["cmd"] = " ".join(["python", str(Path(__file__).parent / "stage_tracer.py"), module,
                                     f"{TRACES}/{name}{item}.json", *args])
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copytree(REPO / "prompts", root / "prompts")
    (root / "emoji-styles").mkdir()
    shutil.copy(REPO / "emoji-styles" / "package-lock.json", root / "emoji-styles")  # an ingest dep
    shutil.copytree(REPO / "results", root / "results")  # human_eval_aggregate's results_dir (no answers yet)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, check=True)
    commit(root, "v0")
    return root


def env(root: Path) -> dict[str, str]:
    """This venv's python first on PATH (DVC stages call ``python``) and the copy's code imported."""
    out = dict(os.environ)
    out["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), out.get("PATH", "")])
    out["PYTHONPATH"] = str(root / "src")
    out.setdefault("TQDM_DISABLE", "1")
    return out


def run(root: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=root, env=env(root), capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done.stdout


def dvc(root: Path, *args: str) -> str:
    return run(root, DVC, *args)


def status(root: Path, *stages: str) -> dict:
    """``dvc status --json``: {stage: [changes]} for stages that are not up to date."""
    return json.loads(dvc(root, "status", "--json", *stages) or "{}")


def commit(root: Path, message: str) -> None:
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty")


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def locked_md5(root: Path, stage: str, path: str, kind: str = "outs") -> str:
    return next(item["md5"] for item in lock(root)[stage][kind] if item["path"] == path)


def copy_repo(source: Path, target: Path) -> Path:
    """A copy of a reproduced repo (git history, DVC cache, outputs, traces) to change without touching ``source``."""
    shutil.copytree(source, target, symlinks=True)
    return target
