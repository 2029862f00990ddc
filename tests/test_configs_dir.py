"""Every YAML in configs/ validates against its command's schema (files are named <command>_*.yaml, studies
study_<kind>_*.yaml)."""

import pathlib

import pytest

from clp_jax.cli.eval_cmd import EvalConfig
from clp_jax.config import load_config
from clp_jax.posttrain.study import StudyConfig
from clp_jax.train.config import TrainConfig
from clp_jax.transfer.run import TransferConfig
from clp_jax.transfer.study import TransferStudyConfig

SCHEMAS = {"eval": EvalConfig, "transfer": TransferConfig, "train": TrainConfig, "sft": TrainConfig,
           "study_clt": StudyConfig, "study_transfer": TransferStudyConfig}
CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_validates(path):
    command = path.name.split("_", 1)[0]
    if command == "study":  # study_<kind>_*.yaml
        command = "_".join(path.name.split("_", 2)[:2])
    assert command in SCHEMAS, f"{path.name}: no schema for command {command!r}; name it <command>_*.yaml"
    load_config(SCHEMAS[command], path)
