"""The config loader: YAML + overrides into typed sections, one-line errors, and an atomic save round trip."""

from typing import Literal

import pytest
import yaml
from pydantic import Field

from clp_jax.config import ConfigModel, config_to_dict, load_config, save_config
from clp_jax.errors import ClpError


class Model(ConfigModel):
    path: str
    dtype: Literal["float32", "bfloat16"] = "float32"


class Train(ConfigModel):
    learning_rate: float = 3e-4
    steps: int = 100
    tags: list[str] = Field(default_factory=list)


class Data(ConfigModel):
    weights: dict[str, float] = Field(default_factory=dict)


class Run(ConfigModel):
    model: Model
    train: Train = Train()
    data: Data | None = None
    name: str | None = None
    seed: int = 0


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ClpError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_values_load_from_yaml(tmp_path):
    text = "model:\n  path: gpt2\n  dtype: bfloat16\ntrain:\n  steps: 7\n  tags: [a, b]\nseed: 3\n"
    cfg = load_config(Run, write(tmp_path, text))
    expected = Run(model=Model(path="gpt2", dtype="bfloat16"), train=Train(steps=7, tags=["a", "b"]), seed=3)
    assert cfg == expected
    assert cfg.train.learning_rate == 3e-4


def test_empty_file_and_no_file_mean_no_keys(tmp_path):
    assert load_config(Run, write(tmp_path, ""), ["model.path=x"]) == Run(model=Model(path="x"))
    assert load_config(Run, None, ["model.path=x"]) == Run(model=Model(path="x"))


def test_overrides_win_over_yaml_and_apply_in_order(tmp_path):
    path = write(tmp_path, "model: {path: gpt2}\ntrain: {steps: 7, learning_rate: 0.1}\n")
    cfg = load_config(Run, path, ["train.steps=9", "train.learning_rate=3e-4", "train.steps=11"])
    assert cfg.train.steps == 11
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.model.path == "gpt2"


def test_override_values_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "model: {path: gpt2}\nname: run\n")
    cfg = load_config(Run, path, ["train.tags=[x, y]", "name=null", "model.dtype=bfloat16"])
    assert cfg.train.tags == ["x", "y"] and cfg.name is None and cfg.model.dtype == "bfloat16"


def test_override_of_str_field_keeps_the_text(tmp_path):
    cfg = load_config(Run, None, ["model.path=123", "name=1.10"])
    assert cfg.model.path == "123" and cfg.name == "1.10"


def test_nested_override_creates_absent_sections(tmp_path):
    path = write(tmp_path, "model: {path: gpt2}\n")
    cfg = load_config(Run, path, ["train.steps=5", "data.weights.de=0.75", "data.weights.en=0.25"])
    assert cfg.train == Train(steps=5)
    assert cfg.data == Data(weights={"de": 0.75, "en": 0.25})


@pytest.mark.parametrize(
    ("text", "bad", "suggestion"),
    [
        ("model: {path: gpt2}\nsede: 1\n", "'sede'", "'seed'"),
        (
            "model: {path: gpt2}\ntrain: {lerning_rate: 0.1}\n",
            "'train.lerning_rate'",
            "'train.learning_rate'",
        ),
        ("model: {path: gpt2, dtyp: float32}\n", "'model.dtyp'", "'model.dtype'"),
    ],
)
def test_unknown_yaml_key_names_key_file_and_suggestion(tmp_path, text, bad, suggestion):
    path = write(tmp_path, text)
    message = error_of(Run, path)
    assert message.startswith(f"{path}: unknown key {bad}")
    assert f"did you mean {suggestion}?" in message


@pytest.mark.parametrize(
    ("override", "bad", "suggestion"),
    [
        ("sede=1", "'sede'", "'seed'"),
        ("train.lerning_rate=0.1", "'train.lerning_rate'", "'train.learning_rate'"),
        ("train={stpes: 3}", "'train.stpes'", "'train.steps'"),
    ],
)
def test_unknown_override_key_names_key_and_suggestion(override, bad, suggestion):
    message = error_of(Run, None, ["model.path=x", override])
    assert message.startswith(f"command line: unknown key {bad}")
    assert f"did you mean {suggestion}?" in message


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of(Run, None, ["model.path=x", "train.zzzzzz=1"])
    assert "'train.zzzzzz'" in message and "learning_rate, steps, tags" in message


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    path = write(tmp_path, "model: {path: gpt2}\ntrain: {steps: many}\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}: bad value for 'train.steps'")
    assert "integer" in message and "'many'" in message
    message = error_of(Run, path, ["train.steps=3", "model.dtype=float16"])
    assert message.startswith("command line: bad value for 'model.dtype'")
    assert "'float32' or 'bfloat16'" in message and "'float16'" in message


def test_wrong_type_in_list_and_missing_key(tmp_path):
    message = error_of(Run, None, ["model.path=x", "train.tags=[a, [b]]"])
    assert "'train.tags.1'" in message
    message = error_of(Run, write(tmp_path, "seed: 1\n"))
    assert "missing required key 'model'" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  path: gpt2\ntrain: [1, 2\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}:") and "invalid YAML" in message


def test_missing_file_and_non_mapping_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(Run, missing) == f"{missing}: config file not found"
    path = write(tmp_path, "- a\n- b\n")
    assert "top level, found list" in error_of(Run, path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps", "must look like 'section.key=value'"),
        ("train..steps=1", "must look like 'section.key=value'"),
        ("train.learning_rate.x=1", "'train.learning_rate' is a value, not a section"),
        ("train.steps=[1", "not valid YAML"),
    ],
)
def test_malformed_overrides(override, expected):
    message = error_of(Run, None, [override])
    assert message.startswith("command line:") and expected in message and override in message


def test_save_then_load_round_trip_in_schema_order(tmp_path):
    cfg = load_config(Run, None, ["model.path=gpt2", "train.tags=[a]", "data.weights.de=1.0", "seed=5"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(Run, out) == cfg
    saved = yaml.safe_load(out.read_text())
    assert saved == config_to_dict(cfg)
    assert list(saved) == list(Run.model_fields)
    assert list(saved["train"]) == ["learning_rate", "steps", "tags"]
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]


def test_save_overwrites_and_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "config.yaml"
    save_config(Run(model=Model(path="a")), out)
    save_config(Run(model=Model(path="b")), out)
    assert load_config(Run, out).model.path == "b"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("clp_jax.config.os.replace", fail)
    with pytest.raises(OSError):
        save_config(Run(model=Model(path="c")), out)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert load_config(Run, out).model.path == "b"
