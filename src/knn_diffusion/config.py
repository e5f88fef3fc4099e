"""One typed schema for all of ``params.yaml``.

Each concern owns its section dataclass (next to its code); this module composes them into
:class:`Params`, loads YAML + ``key=value`` overrides through OmegaConf's structured configs, and turns
every way a value can be wrong (unknown key, wrong type, bad enum, out of range) into a
:class:`ConfigError` that names the file, the key, the value and what is allowed.

Conventions for section dataclasses:

* enums are ``class X(str, Enum)`` so members compare equal to their YAML strings;
* numeric ranges go in field metadata: ``field(default=0.1, metadata=between(0, 1))``;
* no ``${}`` interpolation anywhere (``dvc exp run -S`` rewrites params.yaml).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knn_diffusion.config_fields import ConfigError, between, flatten, out_of_range, to_plain  # noqa: F401 (ConfigError re-exported)
from knn_diffusion.data.config import DataConfig, Source
from knn_diffusion.encoders.config import EmbedConfig, EncoderConfig, EncoderKind, judge_defaults
from knn_diffusion.evaluation.config import EvaluateConfig
from knn_diffusion.human_eval.config import (
    HumanEvalAggregateConfig,
    HumanEvalConfig,
    manipulation_results,
    manipulation_study,
)
from knn_diffusion.manipulation.config import (
    EditSampler,
    EvaluateManipulationConfig,
    ManipulationTrainConfig,
    PairsConfig,
)
from knn_diffusion.models.continuous.config import ContinuousSampler, ContinuousTrainConfig
from knn_diffusion.models.discrete.config import DiscreteSampler, DiscreteTrainConfig, TokenizerConfig
from knn_diffusion.retrieval.config import IndexConfig, KnnConfig, RetrievalConfig
from knn_diffusion.tracking.config import TrackingConfig

DEFAULT_PARAMS = Path("params.yaml")


# ----------------------------------------------------------------------------------------------
# The two sections with no library package of their own: the sample stage's and the flow's.


@dataclass
class RuntimeConfig:
    """How a stage computes, never what: read by every stage, not a DVC param (stages/common.py)."""

    # torch intra-op threads of each stage process; 0: OMP_NUM_THREADS when set (the flows set it to
    # cores / stage processes side by side), else every core this process may use.
    threads: int = field(default=0, metadata=between(0))


@dataclass
class ContinuousSampleSettings(ContinuousSampler):
    guidance: float = field(default=8.0, metadata=between(0, 50))  # paper: lambda = 8 (chosen on val: docs/defaults.md)


@dataclass
class DiscreteSampleSettings(DiscreteSampler):
    guidance: float = field(default=8.0, metadata=between(0, 50))  # on the logits; paper: lambda = 8


@dataclass
class SampleConfig:
    """The ``sample`` stage: default prompts, generated once per index (the 2nd is the swapped index)."""

    prompts: list[str] = field(default_factory=lambda: [
        "an emoji of a red heart", "an emoji of a smiling cat face", "an emoji of a green apple",
        "an emoji of a yellow star", "an emoji of a blue car", "an emoji of a pizza",
        "an emoji of a dog face", "an emoji of a flag of Japan"])
    # A text file of prompts, one per line, used instead of ``prompts`` when set. It must lie under
    # prompts/, which dvc.yaml declares as a dep of the stage, so editing it reruns sampling.
    prompts_file: str = ""
    indexes: list[str] = field(default_factory=lambda: ["openmoji", "noto"])
    seed: int = 0
    # Per backbone (the stage's ``--model``; dvc.yaml declares only that one's key, so changing the
    # other backbone's settings reruns nothing of this one).
    continuous: ContinuousSampleSettings = field(default_factory=ContinuousSampleSettings)
    discrete: DiscreteSampleSettings = field(default_factory=DiscreteSampleSettings)


class Backbone(str, Enum):
    continuous = "continuous"  # the pixel-space U-Net (train_continuous)
    discrete = "discrete"      # VQ tokens + transformer (tokenizer, train_discrete)


@dataclass
class PipelineConfig:
    """What the Prefect flow runs: stages tagged ``meta: {backbone: X}`` in dvc.yaml (and what needs
    them) are skipped unless X is listed here."""

    backbones: list[Backbone] = field(default_factory=lambda: [Backbone.continuous, Backbone.discrete])


@dataclass
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the retrieval encoder
    judge: EncoderConfig = field(default_factory=judge_defaults)  # scores generated images (evaluate)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    train_continuous: ContinuousTrainConfig = field(default_factory=ContinuousTrainConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_discrete: DiscreteTrainConfig = field(default_factory=DiscreteTrainConfig)
    manipulation_pairs: PairsConfig = field(default_factory=PairsConfig)
    train_manipulation: ManipulationTrainConfig = field(default_factory=ManipulationTrainConfig)
    edit: EditSampler = field(default_factory=EditSampler)  # `knn-diffusion edit` and evaluate_manipulation
    evaluate_manipulation: EvaluateManipulationConfig = field(default_factory=EvaluateManipulationConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # inference-time: sample/generate/evaluate
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    human_eval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    human_eval_manipulation: HumanEvalConfig = field(default_factory=manipulation_study)
    human_eval_aggregate: HumanEvalAggregateConfig = field(default_factory=HumanEvalAggregateConfig)
    human_eval_aggregate_manipulation: HumanEvalAggregateConfig = field(default_factory=manipulation_results)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    full_key = getattr(err, "full_key", None) or ""
    text = str(err).split("\n")[0]
    if "not in" in text and "Key '" in text:
        return f"unknown key '{full_key}' ({text})"
    value = getattr(err, "value", None)
    return f"key '{full_key}' has bad value {value!r}: {text}"


def _check_values(node: Any, prefix: str, where: str) -> None:
    """Walk the dataclass tree and enforce range metadata (enums are checked by OmegaConf)."""
    if not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if isinstance(value, dict):
            for name, item in value.items():
                _check_values(item, f"{key}.{name}.", where)
        elif dataclasses.is_dataclass(value):
            _check_values(value, f"{key}.", where)
        for v in value if isinstance(value, list) else [value]:
            if problem := out_of_range(f.metadata, v):
                raise ConfigError(f"{where}: key '{key}' has bad value {v!r}: {problem}")


def _cross_checks(params: Params, where: str) -> None:
    data = params.data
    if data.generator_dataset not in data.datasets:
        raise ConfigError(f"{where}: key 'data.generator_dataset' has bad value "
                          f"{data.generator_dataset!r}: expected one of {sorted(data.datasets)}")
    if len(data.background) != 3 or any(not 0 <= c <= 255 for c in data.background):
        raise ConfigError(f"{where}: key 'data.background' has bad value {data.background!r}: "
                          "expected three integers in [0, 255]")
    if data.split.val + data.split.test >= 1:
        raise ConfigError(f"{where}: keys 'data.split.val' + 'data.split.test' = "
                          f"{data.split.val + data.split.test}: expected a sum below 1")
    for section in ("train_continuous", "train_discrete"):
        if getattr(params, section).k > params.knn.k_max:
            raise ConfigError(f"{where}: key '{section}.k' has bad value {getattr(params, section).k}: "
                              f"expected at most knn.k_max = {params.knn.k_max}")
    if params.train_discrete.sampling.steps > params.train_discrete.transition.steps:
        raise ConfigError(f"{where}: key 'train_discrete.sampling.steps' has bad value "
                          f"{params.train_discrete.sampling.steps}: expected at most train_discrete.transition.steps "
                          f"= {params.train_discrete.transition.steps}")
    if params.manipulation_pairs.min_size > params.manipulation_pairs.max_size:
        pairs = params.manipulation_pairs
        raise ConfigError(f"{where}: key 'manipulation_pairs.min_size' has bad value {pairs.min_size}: "
                          f"expected at most manipulation_pairs.max_size = {params.manipulation_pairs.max_size}")
    bad_splits = sorted(set(params.index.generator_splits) - {"train", "val", "test"})
    if bad_splits or not params.index.generator_splits:
        raise ConfigError(f"{where}: key 'index.generator_splits' has bad value {params.index.generator_splits!r}: "
                          "expected a non-empty subset of ['train', 'val', 'test']")
    _check_paired_datasets(params, where)
    for name, ds in data.datasets.items():
        if ds.source in (Source.folder, Source.webdataset, Source.iconify) and not ds.path:
            raise ConfigError(f"{where}: key 'data.datasets.{name}.path' is empty: source "
                              f"'{ds.source.value}' needs a path")


def _check_paired_datasets(params: Params, where: str) -> None:
    """The generator's dataset is never pairs-only, and the judge's paired corpora are disjoint from the
    retrieval encoder's and its image tower has another shape (an independent judge sees none of the styles
    the retriever was aligned on, through other layers).
    Listed datasets that are not ingested (or are the generator's) are skipped by the stages."""
    data = params.data
    if data.datasets[data.generator_dataset].pairs_only:
        raise ConfigError(f"{where}: key 'data.datasets.{data.generator_dataset}.pairs_only' is true for "
                          "data.generator_dataset: the generator's dataset is embedded and indexed")
    if params.encoder.kind == EncoderKind.aligned and params.judge.kind == EncoderKind.aligned:
        shared = sorted(set(params.encoder.alignment.datasets) & set(params.judge.alignment.datasets))
        if shared:
            raise ConfigError(f"{where}: keys 'encoder.alignment.datasets' and 'judge.alignment.datasets' share "
                              f"{shared}: the judge must align on styles the retrieval encoder never saw")
        if params.judge.vision.architecture() == params.encoder.vision.architecture():
            raise ConfigError(f"{where}: keys 'encoder.vision' and 'judge.vision' give both image towers the shape "
                              f"{params.judge.vision.architecture()}: the judge needs another tower or other sizes")


def build_params(raw: dict | None, overrides: Iterable[str] = (), where: str = "params") -> Params:
    """Merge ``raw`` (a parsed params mapping) and ``key=value`` overrides onto the schema."""
    schema = OmegaConf.structured(Params)
    if isinstance((raw or {}).get("data"), dict) and "datasets" in raw["data"]:
        schema.data.datasets = {}  # a listed collection replaces the default one (a merge would keep openmoji)
    try:
        merged = OmegaConf.merge(schema, raw or {})
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_omegaconf_message(err)}") from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override: {_omegaconf_message(err)}") from None
    try:
        params = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_omegaconf_message(err)}") from None
    _check_values(params, "", where)
    _cross_checks(params, where)
    return params


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for key, value in flatten(raw).items():
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{path}: key '{key}' has value {value!r} with '${{...}}' interpolation, "
                              "which `dvc exp run -S` would destroy; write a literal value")
    return build_params(raw, overrides, where=str(path))


def write_params(params: Params, path: str | os.PathLike = DEFAULT_PARAMS) -> None:
    """Write a validated params file atomically (used by presets)."""
    path = Path(path)
    text = yaml.safe_dump(to_plain(params), sort_keys=False)
    with tempfile.NamedTemporaryFile("w", dir=path.parent or ".", delete=False, suffix=".tmp") as fh:
        fh.write(text)
    os.replace(fh.name, path)
