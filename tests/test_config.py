from pathlib import Path

import pytest

from tessera.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: t\ndata_root: /tmp/x\nsource:\n  path: in.parquet\n"


@pytest.mark.parametrize("name", ["demo.yaml", "laion_coco_stage1.yaml", "aesthetic_stage2.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name, environ={})
    assert cfg.name and cfg.data_root and cfg.source.path


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, MINIMAL + "download:\n  shard_sise: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert str(path) in str(e.value) and "download.shard_sise: unknown key" in str(e.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, MINIMAL + "download:\n  shard_size: lots\n")
    with pytest.raises(ConfigError, match=r"download\.shard_size: .*integer.*'lots'"):
        load_config(path, environ={})


def test_missing_value(tmp_path):
    path = write(tmp_path, "name: t\nsource:\n  path: x\n")
    with pytest.raises(ConfigError, match="data_root: missing value"):
        load_config(path, environ={})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))


def test_environment_and_command_line_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    env = {"TESSERA_DATA_ROOT": "s3://bucket/data", "RAY_ADDRESS": "ray://head:10001"}
    cfg = load_config(path, ["download.shard_size=77", "source.path=gs://b/*.parquet"], environ=env)
    assert cfg.data_root == "s3://bucket/data"
    assert cfg.ray.address == "ray://head:10001"
    assert cfg.download.shard_size == 77 and cfg.source.path == "gs://b/*.parquet"
    # The command line wins over the environment.
    cfg = load_config(path, ["data_root=/elsewhere"], environ=env)
    assert cfg.data_root == "/elsewhere"


def test_bad_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["no-equals-sign"], environ={})
    with pytest.raises(ConfigError, match=r"download\.nope: unknown key"):
        load_config(path, ["download.nope=1"], environ={})
