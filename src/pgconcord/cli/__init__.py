"""The `pgconcord` command. Every failure the user can cause ends in one line and an exit code;
the commands' JSON is what scripts and the web console read."""

from __future__ import annotations

import sys

import click
import psycopg

from pgconcord import __version__
from pgconcord.cli import conflicts, demo, history, membership, replication
from pgconcord.cli.options import error_console, global_options
from pgconcord.errors import PgconcordError

__all__ = ["main", "main_group"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgconcord")
@global_options
def main_group() -> None:
    """Asynchronous multi-master replication for PostgreSQL.

    --config, -v and --log-format may also follow the command's name."""


main_group.add_command(replication.setup)
main_group.add_command(replication.run)
main_group.add_command(replication.sync)
main_group.add_command(replication.status)
main_group.add_command(replication.verify)
main_group.add_command(conflicts.conflicts)
main_group.add_command(history.history)
main_group.add_command(membership.join_command)
main_group.add_command(membership.part)
main_group.add_command(replication.grant)
main_group.add_command(demo.demo)


def main() -> None:
    try:
        main_group(standalone_mode=False)
    except click.exceptions.Abort:
        error_console.print("pgconcord: interrupted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except PgconcordError as error:
        click.echo(f"pgconcord: {error}", err=True)
        sys.exit(error.exit_code)
    except psycopg.Error as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        click.echo(f"pgconcord: database error: {first_line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        error_console.print("pgconcord: interrupted")
        sys.exit(130)
