"""What the commands share: the consoles they print on, the --config, -v, --log-format and
--json options, and reading the config file.

--config, -v and --log-format may stand before the command's name (options of the group) or
after it (options of every command): operators type `pgconcord status --config f -v` as often
as `pgconcord --config f status`. A value after the name wins; -v counts wherever it stands."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from pgconcord.cli import logs
from pgconcord.config import ClusterConfig, load_config

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: a message is one line however narrow the terminal, so scripts can read it.
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

# Keys of click's Context.meta, which every context of one invocation shares.
_CONFIG = "pgconcord.config"
_VERBOSITY = "pgconcord.verbosity"
_LOG_FORMAT = "pgconcord.log_format"


def _remember_config(context: click.Context, _param: click.Parameter, value: str | None) -> None:
    context.meta[_CONFIG] = value


def _resolve_config(
    context: click.Context, _param: click.Parameter, value: str | None
) -> str | None:
    # The group's option carries PGCONCORD_CONFIG; a command's own --config overrides both.
    return value if value is not None else context.meta.get(_CONFIG)


def _add_verbosity(context: click.Context, _param: click.Parameter, value: int) -> None:
    context.meta[_VERBOSITY] = context.meta.get(_VERBOSITY, 0) + value
    if value or context.parent is None:
        _reconfigure(context)


def _set_log_format(context: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        context.meta[_LOG_FORMAT] = value
    if value is not None or context.parent is None:
        _reconfigure(context)


def _reconfigure(context: click.Context) -> None:
    logs.configure(context.meta.get(_VERBOSITY, 0), context.meta.get(_LOG_FORMAT, "text"))


def _verbose_option(function: F) -> F:
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_add_verbosity,
        help="More log output (-vv for debug).",
    )(function)


def _log_format_option(function: F) -> F:
    return click.option(
        "--log-format",
        type=click.Choice(logs.LOG_FORMATS),
        expose_value=False,
        callback=_set_log_format,
        help="Log lines as text, or as one JSON object a line (for log collectors).",
    )(function)


def global_options(function: F) -> F:
    """The group's: before the command's name."""
    function = click.option(
        "--config",
        envvar="PGCONCORD_CONFIG",
        metavar="FILE",
        expose_value=False,
        is_eager=True,
        callback=_remember_config,
        help="Cluster file (TOML); default: $PGCONCORD_CONFIG.",
    )(function)
    return _log_format_option(_verbose_option(function))


def logging_options(function: F) -> F:
    """-v and --log-format after the name of a command that reads no config (demo)."""
    return _log_format_option(_verbose_option(function))


def config_option(function: F) -> F:
    function = click.option(
        "--config",
        "config_path",
        metavar="FILE",
        callback=_resolve_config,
        help="Cluster file (TOML); default: $PGCONCORD_CONFIG.",
    )(function)
    return logging_options(function)


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(function)


def _load(config_path: str | None) -> ClusterConfig:
    return load_config(config_path)


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))
