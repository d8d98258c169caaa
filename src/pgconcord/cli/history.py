"""`pgconcord history TABLE KEY`: one row's whole story across the nodes (history.story)."""

from __future__ import annotations

import sys

import click

from pgconcord.cli.options import _load, _print_json, config_option, json_option


@click.command()
@config_option
@json_option
@click.argument("table")
@click.argument("key")
def history(config_path: str | None, as_json: bool, table: str, key: str) -> None:
    """The story of one row of an audited table: who changed it where and when, old and new
    values, and what replication did with each change on every node.

    TABLE is schema.table (public. may be left out); KEY a JSON object ('{"id": 7}') or, for
    a one-column key, its value (7).
    """
    from pgconcord.history.story import read_story, render_text

    config = _load(config_path)
    story = read_story(config, table, key)
    for problem in story.unreachable:
        click.echo(f"pgconcord: {problem}", err=True)
    if as_json:
        _print_json(story.to_json())
    else:
        click.echo(render_text(story))
    if story.unreachable:
        sys.exit(1)
