"""params.yaml validation: every way a value can be wrong names the key, the value and what is allowed."""

import pytest
import yaml

from knn_diffusion.config import ConfigError, Params, build_params, load_params, to_plain, write_params
from tests.conftest import REPO


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.resolution == 32
    assert params.data.datasets["openmoji"].source == "openmoji"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'data.resolutoin'"):
        build_params({"data": {"resolutoin": 64}}, where="p.yaml")


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        build_params({"data": {"shard_size": "many"}}, where="p.yaml")
    message = str(err.value)
    assert "p.yaml" in message and "data.shard_size" in message and "many" in message


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        build_params({"data": {"datasets": {"x": {"source": "flickr"}}}}, where="p.yaml")
    message = str(err.value)
    assert "data.datasets.x.source" in message and "flickr" in message
    assert "openmoji" in message and "webdataset" in message


def test_range_violation_states_the_range():
    with pytest.raises(ConfigError, match=r"'data.split.val' has bad value 0.9: expected a number in \[0, 0.5\]"):
        build_params({"data": {"split": {"val": 0.9}}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.generator_dataset"):
        build_params({"data": {"generator_dataset": "missing"}})
    with pytest.raises(ConfigError, match="data.datasets.mine.path"):
        build_params({"data": {"datasets": {"mine": {"source": "folder"}}, "generator_dataset": "mine"}})


def test_listed_datasets_replace_the_default_ones():
    """A params file naming its datasets gets exactly those (a merge would also ingest openmoji and noto)."""
    params = build_params({"data": {"datasets": {"mine": {"source": "folder", "path": "/x"}},
                                    "generator_dataset": "mine"}})
    assert list(params.data.datasets) == ["mine"]
    assert list(build_params({}).data.datasets) == ["openmoji", "noto"]


def test_overrides_go_through_the_same_validation():
    params = build_params({}, ["data.resolution=64", "data.split.test=0.2"])
    assert params.data.resolution == 64 and params.data.split.test == 0.2
    with pytest.raises(ConfigError, match="data.resolution"):
        build_params({}, ["data.resolution=4"])
    with pytest.raises(ConfigError, match="expected key=value"):
        build_params({}, ["data.resolution"])


def test_interpolation_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("tracking:\n  experiment: ${oc.env:USER}\n")
    with pytest.raises(ConfigError, match=r"tracking.experiment.*interpolation"):
        load_params(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_write_roundtrip(tmp_path):
    params = build_params({}, ["data.resolution=48"])
    write_params(params, tmp_path / "params.yaml")
    assert to_plain(load_params(tmp_path / "params.yaml")) == to_plain(params)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["data"]["resolution"] == 48


def test_gpu_preset_merges_and_validates(tmp_path):
    from knn_diffusion.cli import apply_preset, list_presets

    assert "gpu" in list_presets()
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_preset("gpu", str(path))
    params = load_params(path)
    assert params.data.resolution == 64 and params.train_continuous.preset == "100M"
    assert params.data.datasets["openmoji"].source == "openmoji", "keys the preset does not name are kept"
    with pytest.raises(ConfigError, match="preset 'laptop'"):
        apply_preset("laptop", str(path))
