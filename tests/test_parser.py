"""saft_hf.parser.SaftParser: YAML defaults, flag overrides, `--config` layers in order, unknown keys and bad types
refused in one line naming the file and the field, required fields, and the resolved configuration."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from saft_hf.parser import SaftParser


@dataclass
class Model:
    name: str = field(metadata={"help": "Required: no default."})
    width: int = 8
    rate: float = 1e-3
    mode: Literal["a", "b"] = "a"


@dataclass
class Run:
    steps: list[int] = field(default_factory=lambda: [1, 2])
    shuffle: bool = True
    files: list[str] | None = None
    notes: str | None = None


def _parse(*argv: str, **kwargs):
    return SaftParser((Model, Run), **kwargs).parse_args_and_config(list(argv))


def _write(path: Path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_file_values_are_defaults_that_flags_override(tmp_path):
    config = _write(tmp_path / "c.yaml", {"name": "m", "width": 16, "rate": "1e-4", "steps": [5], "shuffle": False})
    model, run, resolved = _parse("--config", config, "--width", "32", "--mode", "b")
    assert (model.name, model.width, model.rate, model.mode) == ("m", 32, 1e-4, "b")  # YAML 1.1's "1e-4" converted
    assert (run.steps, run.shuffle, run.files) == ([5], False, None)
    # Exactly what the file or a flag set, with the flags' values; fields set nowhere are left out.
    assert resolved == {"name": "m", "width": 32, "rate": 1e-4, "steps": [5], "shuffle": False, "mode": "b"}


def test_a_flag_given_at_its_default_value_is_recorded(tmp_path):
    _, _, resolved = _parse("--name", "m", "--width", "8", "--no_shuffle")
    assert resolved == {"name": "m", "width": 8, "shuffle": False}


def test_later_config_files_override_earlier_ones_and_flags_override_both(tmp_path):
    first = _write(tmp_path / "a.yaml", {"name": "first", "width": 1, "rate": 0.5})
    second = _write(tmp_path / "b.yaml", {"name": "second", "width": 2})
    model, _, resolved = _parse("--config", first, "--config", second, "--width", "3")
    assert (model.name, model.width, model.rate) == ("second", 3, 0.5)
    model, _, _ = _parse("--config", second, "--config", first)
    assert (model.name, model.width) == ("first", 1)
    (tmp_path / "empty.yaml").write_text("")
    model, _, resolved = _parse("--config", str(tmp_path / "empty.yaml"), "--name", "n")
    assert resolved == {"name": "n"} and model.width == 8


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"name": "m", "widht": 3},
            r"Config file {file} sets unknown field\(s\): \['widht'\] \(did you mean width\?\)",
        ),
        ({"name": "m", "width": "many"}, "Config file {file}: width must be an integer, got 'many'"),
        ({"name": "m", "width": 2.5}, "Config file {file}: width must be an integer, got 2.5"),
        ({"name": "m", "rate": [1, 2]}, r"Config file {file}: rate must be a number, got \[1, 2\]"),
        ({"name": "m", "steps": 3}, "Config file {file}: steps must be a list, got 3"),
        ({"name": "m", "steps": [1, "x"]}, "Config file {file}: steps must be an integer, got 'x'"),
        ({"name": "m", "shuffle": "maybe"}, r"Config file {file}: shuffle must be a boolean \(true or false\)"),
        ({"name": "m", "mode": "c"}, "Config file {file}: mode must be one of a, b, got 'c'"),
        (["name", "m"], "Config file {file} must hold a mapping of field names to values"),
    ],
)
def test_bad_file_values_are_refused_naming_the_file_and_field(tmp_path, values, message):
    config = _write(tmp_path / "bad.yaml", values)
    with pytest.raises(ValueError, match=message.format(file=config)) as refused:
        _parse("--config", config)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "m", "--width", "x"], "argument --width: invalid int value: 'x'"),
        (["--name", "m", "--mode", "c"], "argument --mode: invalid choice: 'c'"),
        (["--name", "m", "--colour", "red"], "unrecognized arguments: --colour red"),
        (["--name", "m", "--wid", "3"], "unrecognized arguments: --wid 3"),  # no abbreviations
        (["--width", "3"], "name is required: set it in a --config file or with --name"),
        (["--name", "m", "--config", "missing.yaml"], "Cannot read config file missing.yaml"),
    ],
)
def test_bad_command_lines_are_one_line_errors(argv, message):
    with pytest.raises(ValueError, match=message) as refused:
        _parse(*argv)
    assert "\n" not in str(refused.value) and "usage:" not in str(refused.value)


def test_a_required_field_may_come_from_a_file(tmp_path):
    model, _, _ = _parse("--config", _write(tmp_path / "c.yaml", {"name": "from-file"}))
    assert model.name == "from-file"


def test_named_paths_are_relative_to_their_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    config = _write(tmp_path / "sub" / "c.yaml", {"name": "m", "files": ["x.yaml", "/abs/y.yaml"], "notes": "n.txt"})
    _, run, _ = _parse("--config", config, paths_relative_to_config=("files",))
    assert run.files == [str(tmp_path / "sub" / "x.yaml"), "/abs/y.yaml"] and run.notes == "n.txt"
    _, run, _ = _parse("--config", config, "--files", "z.yaml", paths_relative_to_config=("files",))
    assert run.files == ["z.yaml"]  # a flag is relative to the working directory, as given


def test_without_the_config_option_a_config_field_is_an_ordinary_flag():
    @dataclass
    class Merge:
        config: str
        private: bool = False

    (merge,) = SaftParser(Merge, config_option=False).parse_args_and_config(["--config", "recipe.yaml"])[:1]
    assert (merge.config, merge.private) == ("recipe.yaml", False)
