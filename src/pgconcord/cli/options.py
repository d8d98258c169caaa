"""What the commands share: the consoles they print on, the --config and --json options, and
reading the config file."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from pgconcord.config import ClusterConfig, load_config

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: a message is one line however narrow the terminal, so scripts can read it.
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)


def config_option(function: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="PGCONCORD_CONFIG",
        metavar="FILE",
        help="Cluster file (TOML); default: $PGCONCORD_CONFIG.",
    )(function)


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(function)


def _load(config_path: str | None) -> ClusterConfig:
    return load_config(config_path)


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))
