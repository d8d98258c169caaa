"""How applying fails, and whose fault a database error is: a change that cannot be applied as
it is (parked), a target that refuses the agent a table or lacks it (the changes wait for its
operator), or neither (a lost connection, a deadlock: the same work is tried again)."""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors

from pgconcord.apply.plan import TablePlan
from pgconcord.errors import PgconcordError


class ApplyError(PgconcordError):
    """Changes from an origin cannot be applied; they stay queued and are retried."""


class RacedWithLocalWrite(PgconcordError):
    """A merge lost a race with a local write to the same new row: the piece is applied again
    (like a deadlock), now seeing that write."""


class PlansOutdated(PgconcordError):
    """A piece could not be applied with plans made before the target's tables changed (a
    schema change another pull applied meanwhile): the window is staged and planned again,
    not parked."""


class TableDropped(PgconcordError):
    """Changes for a table that was replicated here and has been dropped since: parked (a
    DROP TABLE replicated while another node still wrote to the table), never waited for."""


class TargetProblem(Exception):
    """This node refuses the agent a table (a right missing) or the table is gone: not a
    change that cannot be applied (it is not parked), not an unreachable node. Turned into an
    ApplyError naming node, table and right once the piece's transaction is rolled back."""

    def __init__(self, error: psycopg.DatabaseError, plan: TablePlan) -> None:
        super().__init__(first_line(error))
        self.error = error
        self.plan = plan


def is_data_problem(error: psycopg.DatabaseError) -> bool:
    """A change that cannot be applied as it is (as opposed to a lost connection or a
    deadlock, which a retry of the same work overcomes, or a target problem, which its
    operator fixes: the changes wait for it, none is parked)."""
    if isinstance(error, psycopg.OperationalError | pg_errors.DeadlockDetected):
        return False
    if is_target_problem(error):
        return False
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError | psycopg.ProgrammingError):
        return True
    # Errors raised by the user's ENABLE ALWAYS triggers (PL/pgSQL RAISE).
    return (error.sqlstate or "").startswith("P0")


def is_target_problem(error: psycopg.DatabaseError) -> bool:
    """The target refuses the agent's role a right on a table (a GRANT missing, a row-level
    security policy), or the table is not there: nothing is wrong with the change itself."""
    return isinstance(error, pg_errors.InsufficientPrivilege | pg_errors.UndefinedTable)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
