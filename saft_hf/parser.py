"""`SaftParser`: the one command-line and config-file parser of the recipes (and, in time, the `saft-hf` command), in
the style of TRL's `TrlParser.parse_args_and_config`.

Every field of the dataclasses is a snake_case flag (`HfArgumentParser`). `--config FILE.yaml` (repeatable) supplies
values for any of them; later files override earlier ones, and flags given on the command line override the files.
A file that sets an unknown field, or a value of the wrong type or outside a field's choices, is refused in one
line naming the file and the field; so is a bad flag (`argument --lora_r: invalid int value: 'x'`), and a required
field set nowhere. The parser also returns the resolved configuration: every value set by a file or a flag, which is
what a run records so that `--config` on that record runs it again.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import DataClassType, string_to_bool

CONFIG_DEST = "config"
# What a file value of a field converted by these types must look like, for the error message.
_KINDS = {int: "an integer", float: "a number", string_to_bool: "a boolean (true or false)"}


class SaftParser(HfArgumentParser):
    """`HfArgumentParser` with `--config FILE.yaml` layers, one-line errors and the resolved configuration.

    `paths_relative_to_config` names fields holding file paths (or lists of them) that a config file gives relative
    to itself, so that the file works from any working directory. `config_option=False` leaves `--config` out, for
    a command whose own `config` field means something else."""

    def __init__(
        self,
        dataclass_types: DataClassType | Iterable[DataClassType],
        *,
        paths_relative_to_config: Sequence[str] = (),
        config_option: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("allow_abbrev", False)  # a mistyped flag is refused, not completed to another one
        super().__init__(dataclass_types, **kwargs)
        self.config_dest = CONFIG_DEST if config_option else None
        if config_option:
            self.add_argument(
                f"--{CONFIG_DEST}",
                action="append",
                metavar="FILE.yaml",
                help="YAML file of field values; repeat to layer files (later ones win); flags override them.",
            )
        self.paths_relative_to_config = tuple(paths_relative_to_config)
        # The first action of each field (a boolean field's `--no_<name>` complement comes second).
        self.fields: dict[str, argparse.Action] = {}
        for action in self._actions:
            if action.dest not in (argparse.SUPPRESS, "help", self.config_dest):
                self.fields.setdefault(action.dest, action)

    def error(self, message: str) -> NoReturn:
        """A bad command line is a user error (one line), not argparse's usage text and exit status 2."""
        raise ValueError(f"{message} (see --help)")

    def parse_config(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The resolved configuration of `argv`: the values the `--config` files set, in order, overridden by the
        flags; fields set nowhere are left out (their dataclass defaults apply)."""
        given = self._given_flags(argv)
        file_values: dict[str, Any] = {}
        for path in given.pop(self.config_dest, None) or []:
            file_values |= self.read_config_file(Path(path))
        resolved = file_values | given
        missing = [name for name, action in self.fields.items() if action.required and name not in resolved]
        if missing:
            raise ValueError(f"{missing[0]} is required: set it in a --config file or with --{missing[0]}.")
        return resolved

    def parse_args_and_config(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The dataclasses built from `argv` (see `parse_config`), followed by the resolved configuration."""
        resolved = self.parse_config(argv)
        return (*self.parse_dict(resolved), resolved)

    def read_config_file(self, path: Path) -> dict[str, Any]:
        """The field values a YAML config file sets, converted to the fields' types (an empty file sets none)."""
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"Cannot read config file {path}: {error}") from error
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise ValueError(f"Config file {path} must hold a mapping of field names to values.")
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"Config file {path} sets unknown field(s): {unknown}{hint}.")
        converted = {name: self._convert(path, name, value) for name, value in values.items()}
        for name in self.paths_relative_to_config:
            if isinstance(converted.get(name), str):
                converted[name] = str(path.parent / converted[name])
            elif isinstance(converted.get(name), list):
                converted[name] = [str(path.parent / item) for item in converted[name]]
        return converted

    def _given_flags(self, argv: Sequence[str] | None) -> dict[str, Any]:
        """The fields given on the command line (and the `--config` files), converted by their flags' types: the
        actions' defaults are suppressed for the parse, so only what `argv` names appears."""
        saved = [(action, action.default, action.required) for action in self._actions]
        try:
            for action in self._actions:
                action.default, action.required = argparse.SUPPRESS, False
            return vars(self.parse_args(argv))
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required

    def _convert(self, path: Path, name: str, value: Any) -> Any:
        """A file's `value` of field `name` as its flag would parse it; None stays None (an optional field)."""
        action = self.fields[name]
        if value is None:
            return None
        if action.nargs in ("+", "*"):
            if not isinstance(value, list):
                raise ValueError(f"Config file {path}: {name} must be a list, got {value!r}.")
            return [self._convert_one(path, name, action, item) for item in value]
        return self._convert_one(path, name, action, value)

    @staticmethod
    def _convert_one(path: Path, name: str, action: argparse.Action, value: Any) -> Any:
        # Types other than these (str, and the dict/object fields of TrainingArguments) take the YAML value as it is.
        if action.type in _KINDS or action.choices is not None:
            kind = _KINDS.get(action.type, "one value")
            if isinstance(value, (list, dict)):
                raise ValueError(f"Config file {path}: {name} must be {kind}, got {value!r}.")
            if action.type is not None:
                try:
                    value = action.type(str(value))
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    raise ValueError(f"Config file {path}: {name} must be {kind}, got {value!r}.") from None
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise ValueError(f"Config file {path}: {name} must be one of {choices}, got {value!r}.")
        return value


__all__ = ["SaftParser"]
