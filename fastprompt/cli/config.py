"""`--config FILE`: a YAML or TOML file of command-line flags; flags given on the command line override it.

Keys are the flag names without the leading dashes (``batch-size`` or ``batch_size``); values are what the flag
takes: ``lr: 0.001``, ``pretrained: true``, ``crop-scale: [0.7, 1.0]``, ``model-kwargs: {depth: 2}``. Every value is
checked here, with the flag's own type and choices, before torch is imported. A train run writes the resolved flags
(file + command line) to ``RUN/config.yaml``, so ``fastprompt train --config RUN/config.yaml --output-dir NEW``
repeats it. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastprompt.cli.common import UsageError

__all__ = ["CONFIG_FLAG", "RESOLVED_CONFIG", "expand_config", "load_config_file", "resolved_settings", "write_settings"]

CONFIG_FLAG = "--config"
RESOLVED_CONFIG = "config.yaml"
# flags a config file accepts but RUN/config.yaml leaves out: how one invocation behaves, not what the run is
_NOT_RECORDED = frozenset({"resume", "debug", "quiet"})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The flat mapping a .yaml/.yml or .toml file holds; a UsageError when it cannot be read or is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{CONFIG_FLAG} {path} does not exist; pass a YAML (.yaml/.yml) or TOML (.toml) file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            raise UsageError(f"{CONFIG_FLAG} {path}: unknown file type {suffix!r}; use .yaml, .yml or .toml")
    except UsageError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError, OSError
        detail = " ".join(str(err).split())
        raise UsageError(f"{CONFIG_FLAG} {path} cannot be parsed ({type(err).__name__}: {detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{CONFIG_FLAG} {path} must hold a mapping of flag: value, got a {type(data).__name__}")
    return data


def _settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Setting name (the flag without dashes, e.g. 'batch-size') -> its argparse action."""
    actions = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        actions[_flag(action).lstrip("-")] = action
    return actions


def _flag(action: argparse.Action) -> str:
    """The action's first long flag (`--hflip`, not `--no-hflip`)."""
    return next(flag for flag in action.option_strings if flag.startswith("--"))


def _given_on_command_line(action: argparse.Action, argv: Sequence[str]) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv for flag in action.option_strings)


def _scalar_text(key: str, value: Any, allowed: str, where: str) -> str:
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: {allowed}")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _allowed(action: argparse.Action) -> str:
    """What a flag accepts, in words, for error messages."""
    if action.choices:
        return f"one of {', '.join(map(str, action.choices))}"
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return "true or false"
    if action.nargs in ("+", "*"):
        return "a mapping of key: value (or a list of key=value strings)"
    return (action.help or action.metavar or action.dest).split(" (default")[0]


def _tokens(key: str, value: Any, action: argparse.Action, where: str) -> list[str]:
    """The command-line tokens that give `action` the file's `value`, after checking the value as argparse would."""
    flag = _flag(action)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: true or false")
        return [flag if value else f"--no-{flag[2:]}"]
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: true or false")
        return [flag] if value != action.default else []
    if action.nargs in ("+", "*") and action.choices is not None:  # --logger csv tensorboard
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or any(item not in action.choices for item in items):
            raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: a list of {_allowed(action)}")
        return [flag, *items]
    if action.nargs in ("+", "*"):  # --model-kwargs / --option KEY=VALUE ...
        if isinstance(value, dict):
            items = [f"{name}={item!r}" for name, item in value.items()]
        elif isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
            items = list(value)
        else:
            raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: {_allowed(action)}")
        return [flag, *items] if items else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        text = ",".join(str(v) for v in value)  # a range such as crop-scale: [0.7, 1.0]
    else:
        text = _scalar_text(key, value, _allowed(action), where)
    converted = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise UsageError(f"{where}: key {key!r} has value {value!r}, which is not allowed: {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{where}: key {key!r} has value {value!r}; allowed: {_allowed(action)}")
    return [f"{flag}={text}"]


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`argv` (the arguments after the command name) with `--config FILE` replaced by the file's flags.

    The file's flags come first, and a flag given on the command line replaces the file's value entirely.
    Unknown keys and bad values raise a UsageError naming the key (and the closest valid key, or what is allowed).
    """
    argv = list(argv)
    files = [i for i, arg in enumerate(argv) if arg == CONFIG_FLAG or arg.startswith(f"{CONFIG_FLAG}=")]
    if not files:
        return argv
    if len(files) > 1:
        raise UsageError(f"{CONFIG_FLAG} is given {len(files)} times; pass one file (flags override it)")
    index = files[0]
    if argv[index] == CONFIG_FLAG:
        if index + 1 >= len(argv):
            raise UsageError(f"{CONFIG_FLAG} needs a file: {CONFIG_FLAG} FILE.yaml")
        path, rest = argv[index + 1], argv[:index] + argv[index + 2 :]
    else:
        path, rest = argv[index].split("=", 1)[1], argv[:index] + argv[index + 1 :]
    actions = _settings_actions(parser)
    tokens: list[str] = []
    for raw_key, value in load_config_file(path).items():
        key = str(raw_key).replace("_", "-")
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, actions, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(actions)}"
            raise UsageError(f"{CONFIG_FLAG} {path}: unknown key {raw_key!r}{hint}")
        if value is None or _given_on_command_line(action, rest):
            continue
        tokens += _tokens(str(raw_key), value, action, f"{CONFIG_FLAG} {path}")
    return tokens + rest


def resolved_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every setting of the parsed command (file + command line + defaults) as plain YAML values."""
    from fastprompt.cli.common import flatten, parse_key_values

    settings: dict[str, Any] = {}
    for key, action in _settings_actions(parser).items():
        if action.dest in _NOT_RECORDED:
            continue
        value = getattr(args, action.dest, None)
        if action.nargs in ("+", "*") and action.choices is not None:
            value = flatten(value) or None
        elif action.nargs in ("+", "*"):
            value = parse_key_values(flatten(value), _flag(action)) or None
        elif isinstance(value, tuple):
            value = list(value)
        settings[key] = value
    return settings


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    """Write the resolved settings as YAML (atomically), with a header saying how to repeat the run."""
    import yaml

    from fastprompt.io import atomic_write_bytes

    header = (
        "# fastprompt train settings (config file + command line + defaults) of this run.\n"
        f"# Repeat it with: fastprompt train {CONFIG_FLAG} {path.name} --output-dir NEW_RUN\n"
    )
    body = yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, allow_unicode=True)
    atomic_write_bytes(path, (header + body).encode())
