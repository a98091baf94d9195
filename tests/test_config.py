"""Config parsing and validation: the structural layer (no torch) and the build layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cockpit_cli.config import OptionOverride, RunConfig, load_config, parse_config
from cockpit_cli.overrides import apply_overrides, parse_override
from cockpit_cli.errors import CockpitError, ExitCode


def test_defaults_and_yaml_round_trip() -> None:
    config = parse_config({"problem": {"name": "mnist_mlp", "width": 3}, "optimizer": {"name": "Adam", "lr": 1e-3, "betas": [0.9, 0.99]}})
    assert config.problem.options == {"width": 3}
    assert config.optimizer.arguments == {"lr": 1e-3, "betas": [0.9, 0.99]}
    assert config.training.eval_every_epochs == 1
    again = parse_config(config.to_dict())
    assert again == config


def test_empty_config_gets_defaults() -> None:
    config = parse_config({})
    assert config == RunConfig()
    assert config.optimizer.arguments == {"lr": 0.1}


def test_ints_become_floats_where_numbers_are_expected() -> None:
    config = parse_config({"schedule": {"name": "StepLR", "interval": "step", "step_size": 3}})
    assert config.schedule is not None and config.schedule.interval == "step"
    assert config.schedule.arguments == {"step_size": 3}


def test_eval_every_steps_replaces_the_epoch_default() -> None:
    config = parse_config({"training": {"eval_every_steps": 10}})
    assert config.training.eval_every_epochs is None and config.training.eval_every_steps == 10


BAD_CONFIGS = [
    ({"problm": {}}, "x.yaml: problm: unknown key; did you mean 'problem'?"),
    ({"training": {"epoch": 3}}, "x.yaml: training.epoch: unknown key; did you mean 'epochs'?"),
    ({"problem": {"batch_size": -1}}, "x.yaml: problem.batch_size: expected a value >= 1, got -1"),
    ({"problem": {"batch_size": 0}}, "x.yaml: problem.batch_size: expected a value >= 1, got 0"),
    ({"problem": {"batch_size": 12.5}}, "x.yaml: problem.batch_size: expected an integer or null, got 12.5"),
    ({"problem": {"download": "yes"}}, "x.yaml: problem.download: expected true or false, got 'yes'"),
    ({"problem": {"name": 7}}, "x.yaml: problem.name: expected a string, got 7"),
    ({"training": {"epochs": "ten"}}, "x.yaml: training.epochs: expected an integer or null, got 'ten'"),
    ({"training": {"epochs": True}}, "x.yaml: training.epochs: expected an integer or null, got True"),
    ({"training": {"device": "gpu"}}, "x.yaml: training.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"),
    ({"training": {"seed": "abc"}}, "x.yaml: training.seed: expected an integer, got 'abc'"),
    ({"training": {"epochs": 1, "steps": 2}}, "x.yaml: training: give either epochs or steps, not both"),
    ({"training": {"eval_every_epochs": 1, "eval_every_steps": 5}}, "x.yaml: training: give either eval_every_epochs or eval_every_steps, not both"),
    ({"training": {"log_every": 0}}, "x.yaml: training.log_every: expected a value >= 1, got 0"),
    ({"training": {"clip_grad_norm": 0}}, "x.yaml: training.clip_grad_norm: expected a positive number (the largest gradient norm an update takes), got 0.0"),
    ({"training": {"clip_grad_norm": ".nan"}}, "x.yaml: training.clip_grad_norm: expected a number or null, got '.nan'"),
    ({"training": {"clip_grad_norm": float("nan")}}, "x.yaml: training.clip_grad_norm: expected a positive number (the largest gradient norm an update takes), got nan"),
    ({"training": 3}, "x.yaml: training: expected a mapping of keys, got 3"),
    ({"schedule": {"interval": "step"}}, "x.yaml: schedule.name: required key is missing"),
    ({"schedule": {"name": "StepLR", "interval": "batch"}}, "x.yaml: schedule.interval: expected one of 'step', 'epoch', got 'batch'"),
    ({"instruments": {"preset": "ecnomy"}}, "x.yaml: instruments.preset: expected one of 'none', 'economy', 'business', 'full', got 'ecnomy'; did you mean 'economy'?"),
    ({"instruments": {"every": -2}}, "x.yaml: instruments.every: expected a value >= 1, got -2"),
    ({"output": {"name": "../escape"}}, "x.yaml: output.name: '../escape' is not a safe directory name"),
    ({"output": {"directory": ["a"]}}, "x.yaml: output.directory: expected a string, got list"),
    ({1: {}}, "x.yaml: 1: keys must be strings"),
]


@pytest.mark.parametrize(("data", "message"), BAD_CONFIGS, ids=[m.split(": ")[1] + str(i) for i, (_, m) in enumerate(BAD_CONFIGS)])
def test_bad_configs_are_rejected_with_one_line(data: dict, message: str) -> None:
    with pytest.raises(CockpitError) as caught:
        parse_config(data, source="x.yaml")
    assert caught.value.message == message
    assert "\n" not in str(caught.value)
    assert caught.value.code == ExitCode.BAD_INPUT


def test_unknown_key_lists_allowed_keys_in_hint() -> None:
    with pytest.raises(CockpitError) as caught:
        parse_config({"training": {"sed": 1}}, source="x.yaml")
    assert "did you mean 'seed'?" in caught.value.message
    assert "device" in caught.value.hint and "epochs" in caught.value.hint


def test_overrides_parse_yaml_scalars_and_create_sections() -> None:
    data = apply_overrides({"optimizer": {"lr": 1}}, ["optimizer.lr=0.01", "training.epochs=3", "problem.download=true", "output.name=abc"])
    assert data == {"optimizer": {"lr": 0.01}, "training": {"epochs": 3}, "problem": {"download": True}, "output": {"name": "abc"}}


def test_overrides_do_not_mutate_the_input() -> None:
    original = {"optimizer": {"lr": 1}}
    apply_overrides(original, ["optimizer.lr=2"])
    assert original == {"optimizer": {"lr": 1}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr", "--set 'optimizer.lr': expected key.path=value"),
        ("=3", "--set '=3': '' is not a key path"),
        ("a..b=3", "--set 'a..b=3': 'a..b' is not a key path"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(CockpitError) as caught:
        parse_override(override)
    assert caught.value.message == message


def test_override_into_a_scalar_is_rejected() -> None:
    with pytest.raises(CockpitError, match="optimizer.lr is not a section"):
        apply_overrides({"optimizer": {"lr": 1}}, ["optimizer.lr.x=2"])


def test_override_values_are_validated_like_the_file_and_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 2\n")
    with pytest.raises(CockpitError) as caught:
        load_config(path, ["training.epochs=-4", "optimizer.lr=0.5"])
    assert caught.value.message == f"{path} with --set training.epochs=-4: training.epochs: expected a value >= 1, got -4"
    path.write_text("training:\n  epochs: 2\n")
    with pytest.raises(CockpitError) as caught:  # a section overridden whole, a key inside an overridden one
        load_config(path, ["optimizer=3"])
    assert caught.value.message == f"{path} with --set optimizer=3: optimizer: expected a mapping of keys, got 3"
    with pytest.raises(CockpitError) as caught:
        load_config(path, ["training.steps=5", "training.epochs=3", "output.name=x"])
    assert caught.value.message == f"{path} with --set training.steps=5 --set training.epochs=3: training: give either epochs or steps, not both"
    config = load_config(path, ["optimizer.lr=2", "output.name=a"])
    assert config.where("optimizer") == f"{path} with --set optimizer.lr=2: optimizer" and config.where("output.names") == f"{path}: output.names"
    assert config.overridden("optimizer.lr") and config.overridden("optimizer") and not config.overridden("optimizer.momentum")
    config = load_config(path, [OptionOverride("output.name=a", "--name a"), "output.name=b"])
    assert config.where("output.name") == f"{path} with --name a --set output.name=b: output.name"  # an option's override as the option
    path.write_text("training:\n  epochs: -1\n")
    with pytest.raises(CockpitError) as caught:  # a wrong value in the file is the file's, whatever else is set
        load_config(path, ["optimizer.lr=2"])
    assert caught.value.message == f"{path}: training.epochs: expected a value >= 1, got -1"


def test_missing_file_directory_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(CockpitError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(CockpitError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem:\n  name: [unclosed\n")
    with pytest.raises(CockpitError) as caught:
        load_config(bad)
    assert caught.value.message.startswith(f"{bad}: malformed YAML at line ")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(CockpitError, match="expected a mapping with sections"):
        load_config(listing)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optimizer:\n  name: SGD\n  lr: 0.1\n  lr: 0.2\n", "line 4: key 'lr' is given twice (first at line 3)"),
        ("training:\n  steps: 5\noptimizer:\n  name: SGD\ntraining:\n  seed: 3\n", "line 5: key 'training' is given twice (first at line 1)"),
        ("instruments:\n  quantities: {HessMaxEV: {every: 2, every: 4}}\n", "line 2: key 'every' is given twice (first at line 2)"),
    ],
)
def test_a_key_given_twice_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    """YAML keeps the last of two equal keys without a word: a second section would drop the first."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CockpitError) as caught:
        load_config(path)
    assert caught.value.message == f"{path}: {message}" and caught.value.hint.startswith("keep one of them")


def test_a_merged_mapping_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: &sgd {name: SGD, lr: 0.1, momentum: 0.9}\nschedule:\n  <<: {name: StepLR, step_size: 3}\n  step_size: 5\n")
    config = load_config(path)
    assert config.schedule.name == "StepLR" and config.schedule.arguments == {"step_size": 5}


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-3`` and ``1.0e3`` as strings; configs read them as YAML 1.2 and Python do."""
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  name: Adam\n  lr: 1e-3\n  eps: 1E-8\n  weight_decay: 5.0e4\n  betas: [.9e0, 999e-3]\n")
    config = load_config(path, ["training.steps=20", "optimizer.lr=2e-3"])
    assert config.optimizer.arguments == {"lr": 2e-3, "eps": 1e-8, "weight_decay": 5e4, "betas": [0.9, 0.999]}
    assert load_config(path).optimizer.arguments["lr"] == 1e-3
    assert parse_override("optimizer.lr=-1e+2") == (["optimizer", "lr"], -100.0)
    whole = load_config(path, ["training.steps=1e4", "problem.batch_size=128.0"])
    assert (whole.training.steps, whole.problem.batch_size) == (10_000, 128) and type(whole.training.steps) is int
    assert parse_override("output.name=e3")[1] == "e3" and parse_override("training.seed=10")[1] == 10


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("problem: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(CockpitError, match="malformed YAML"):
        load_config(evil)


def test_overriding_steps_replaces_the_files_epochs(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 2\n  eval_every_epochs: 1\n")
    config = load_config(path, ["training.steps=7", "training.eval_every_steps=3"])
    assert (config.training.steps, config.training.epochs) == (7, None)
    assert (config.training.eval_every_steps, config.training.eval_every_epochs) == (3, None)
    assert load_config(path, ["training.epochs=5"]).training.epochs == 5
    with pytest.raises(CockpitError, match="give either epochs or steps"):
        load_config(path, ["training.steps=7", "training.epochs=3"])


def test_error_texts() -> None:
    from cockpit_cli.errors import PeerStopped, unknown_name_error

    assert str(CockpitError("what is wrong", "how to fix it")) == "what is wrong (how to fix it)" and str(CockpitError("what")) == "what"
    assert PeerStopped(1, 2, None).message.startswith("another process of this run stopped before training")
    assert PeerStopped(1, 2, 7).message.startswith("another process of this run stopped at step 7")
    error = unknown_name_error("data set", "x", [f"name{i:02d}" for i in range(13)])
    assert error.hint == "known: " + ", ".join(f"name{i:02d}" for i in range(12)) + ", ..."
    assert unknown_name_error("problem", "x", ["a"], "cockpit problems").hint == "`cockpit problems` lists all"


def test_typed_values_describe_and_convert() -> None:
    from typing import Any, Literal

    from cockpit_cli.typed_values import check_value, describe

    assert [describe(list[int]), describe(tuple[float, ...]), describe(list[dict]), describe(dict[str, Any])] == ["a list of integers", "a list of numbers", "a list", "a mapping"]
    assert [describe(int | None), describe(Literal["a", "b"])] == ["an integer or null", "one of 'a', 'b'"]
    converted = check_value([1, 2.5], tuple[float, ...], "w")
    assert converted == (1.0, 2.5) and isinstance(converted, tuple) and all(isinstance(item, float) for item in converted)
    assert isinstance(check_value(3, float, "w"), float)
    assert type(check_value(1e4, int, "w")) is int and check_value(1e4, int | None, "w") == 10_000
    for fraction in (2.5, float("inf"), float("nan")):
        with pytest.raises(CockpitError, match=r"^w: expected an integer, got"):
            check_value(fraction, int, "w")
    with pytest.raises(CockpitError, match=r"^w: expected a list of integers, got list$"):
        check_value([1, "x"], list[int], "w")
    with pytest.raises(CockpitError, match=r"^w: expected a mapping, got 'x'$"):
        check_value("x", dict[str, Any], "w")
    original = {"a": 1}
    copied = check_value(original, dict[str, Any], "w")
    assert copied == original and copied is not original  # the config never shares the caller's dict


@pytest.mark.parametrize(
    ("value", "suggestion"),
    [("Economy", "; did you mean 'economy'?"), ("FULL", "; did you mean 'full'?"), ("busines", "; did you mean 'business'?"), ("cheap", ""), ("gpu", "")],
)
def test_a_choice_in_another_case_or_nearly_right_is_suggested(value: str, suggestion: str) -> None:
    from typing import Literal

    from cockpit_cli.typed_values import check_value

    with pytest.raises(CockpitError) as caught:
        check_value(value, Literal["none", "economy", "business", "full", "cpu"], "w")
    assert caught.value.message == f"w: expected one of 'none', 'economy', 'business', 'full', 'cpu', got {value!r}{suggestion}"
