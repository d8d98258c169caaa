"""`pgconcord demo`: the command; the demo itself is pgconcord.demo."""

from __future__ import annotations

import sys

import click

from pgconcord.cli.options import console, logging_options


@click.command()
@logging_options
@click.option("--seconds", default=40, show_default=True, help="How long the workload runs.")
@click.option("--nodes", "node_count", default=3, show_default=True, help="How many nodes.")
def demo(seconds: int, node_count: int) -> None:
    """Start local throwaway nodes, replicate a live workload with conflicts, verify, clean up."""
    from pgconcord.demo import run_demo

    if not run_demo(seconds=seconds, node_count=node_count, console=console):
        sys.exit(1)
