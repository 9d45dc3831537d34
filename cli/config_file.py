"""`--config FILE`: a command's options from a YAML file, the command line overriding it (as TRL's CLI does).

Keys are the options' long names without the dashes, with `-` or `_` between words (`max-length`, `max_length`);
a flag pair takes true or false under either name (`lora: false` or `no-lora: true`); a repeatable option takes a
list; an option whose value is a comma-separated list (`--loss`, `--loss-weights`) also takes a YAML list. The file
fills the command's defaults (click's default map), so every value goes through the option's own type and checks,
and what the command records (a store's build settings, a run's config) is the resolved value, wherever it came
from. Unknown keys and values of the wrong type are one line naming the key, exit status 2.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import click


class ConfigFileError(click.ClickException):
    """A config file that cannot fill the command's options: one line, exit status 2 (a usage error)."""

    exit_code = 2


def _key(name: str) -> str:
    return name.lstrip("-").replace("_", "-")


def option_keys(command: click.Command) -> dict[str, tuple[click.Option, bool]]:
    """Each key a file may use -> (its option, whether the key is the negative name of a flag pair)."""
    keys: dict[str, tuple[click.Option, bool]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value:
            continue
        for name in param.opts:
            if name.startswith("--"):
                keys[_key(name)] = (param, False)
        for name in param.secondary_opts:
            if name.startswith("--"):
                keys[_key(name)] = (param, True)
    return keys


def read_yaml(path: str) -> dict[str, Any]:
    """The file's mapping (an empty file is an empty mapping)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigFileError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of option names to values, got a YAML "
                              f"{type(data).__name__}")
    return data


def _scalar(value: Any, option: click.Option, ctx: click.Context, where: str) -> Any:
    """`value` checked against the option's type: the value the command line would give for its text."""
    kind = option.type
    if isinstance(value, (dict, list)):
        raise ConfigFileError(f"{where}: expected one value, got a YAML {type(value).__name__}")
    if option.is_flag and not option.multiple:
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool):  # YAML reads yes/no/on/off/true/false unquoted as booleans
        if not isinstance(kind, (click.types.IntParamType, click.types.FloatParamType, click.Choice)):
            raise ConfigFileError(f"{where}: expected text, got {str(value).lower()} (quote it to mean the word)")
        value = str(value).lower()  # the option's type then says what it expected
    if isinstance(kind, click.types.IntParamType) and isinstance(value, float):
        raise ConfigFileError(f"{where}: expected an integer, got {value!r}")
    try:
        kind.convert(value if isinstance(value, (int, float)) else str(value), option, ctx)
    except click.BadParameter as exc:
        raise ConfigFileError(f"{where}: {exc.message}") from None
    return value


def file_defaults(command: click.Command, ctx: click.Context, path: str) -> dict[str, Any]:
    """The file's values as the command's default map: option name -> value, each checked."""
    keys = option_keys(command)
    defaults: dict[str, Any] = {}
    for raw_key, value in read_yaml(path).items():
        key = _key(str(raw_key))
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigFileError(f"{path}: unknown key {raw_key!r}{hint}; keys are the options of "
                                  f"`{ctx.command_path}` (see --help)")
        option, negative = keys[key]
        where = f"{path}: {raw_key}"
        if option.name in defaults:
            raise ConfigFileError(f"{where}: {option.name} is already set in this file")
        if option.multiple:
            values = value if isinstance(value, list) else [value]
            defaults[option.name] = [_scalar(v, option, ctx, where) for v in values]
        elif isinstance(value, list) and option.metavar and "[," in option.metavar:  # a comma-separated list
            defaults[option.name] = ",".join(str(_scalar(v, option, ctx, where)) for v in value)
        else:
            checked = _scalar(value, option, ctx, where)
            if option.is_flag and not option.secondary_opts and option.flag_value is False:
                # a one-sided flag that stores False (--no-length-bucketing): true means the flag is given
                checked = False if checked else option.default
            defaults[option.name] = (not checked) if negative else checked
    return defaults


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    ctx.default_map = {**(ctx.default_map or {}), **file_defaults(ctx.command, ctx, value)}


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command `--config FILE` (read before its other options)."""
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load, metavar="FILE",
                        help="YAML file of option values, keyed by option name (max-length or max_length); options "
                             "given on the command line override it.")(command)
