"""Applying an origin's changes to a target: transactional, exactly once, in the origin's order.

A window (see transport/origin.py) is copied into a temporary stage table on the target, then
applied in pieces of whole source transactions. Each piece commits together with the target's
position for that origin, so a crash at any instant repeats nothing and loses nothing. Inside a
piece the changes are applied set-wise per table: the last change of each row wins over earlier
ones of the same origin, and each row's version (hybrid clock, origin) decides against the local
version (conflict/). The target session runs with session_replication_role = replica, so the
application's triggers and foreign keys stay quiet and nothing applied is captured again; a row
whose parent is still absent once the window is applied is recorded (parent_missing). In the
steady state a window is staged and applied in one transaction, its statements pipelined
(steady.py).

A change that cannot be applied here is parked with the rest of its source transaction
(parking.py; parked.py retries them), and so is every later transaction that touches one of
its rows. A table the
agent's role may not write here, or one that is gone, is not the change's fault: its changes
stay queued, and the pair's error names the node, the table and the right.

The package, in the order a window goes through it: puller (the pair's state machine: turn,
window, pieces), position (the pair's position in the target), stage (the applying session,
the stage table, pieces), plan (how each table is applied here, and the plans cache), setwise
(the one set-wise apply, which the retry of parked changes uses too), parents (rows whose
parent is missing), fallback (change by change; parking decisions) and parking (the parked
changes the apply writes), with errors (what fails, and whose fault it is).
"""

from pgconcord.apply.errors import (
    ApplyError,
    RacedWithLocalWrite,
    TableDropped,
    TargetProblem,
    first_line,
    is_data_problem,
    is_target_problem,
)
from pgconcord.apply.fallback import MAX_FAILURES_ONE_BY_ONE
from pgconcord.apply.plan import TablePlan
from pgconcord.apply.position import IDLE_ADVANCE_SECONDS, Position, Superseded
from pgconcord.apply.puller import DEFAULT_PIECE_ROWS, Puller, PullResult
from pgconcord.apply.setwise import apply_table
from pgconcord.apply.stage import Connection, open_target, piece_selection

__all__ = [
    "DEFAULT_PIECE_ROWS",
    "IDLE_ADVANCE_SECONDS",
    "MAX_FAILURES_ONE_BY_ONE",
    "ApplyError",
    "Connection",
    "Position",
    "PullResult",
    "Puller",
    "RacedWithLocalWrite",
    "Superseded",
    "TableDropped",
    "TablePlan",
    "TargetProblem",
    "apply_table",
    "first_line",
    "is_data_problem",
    "is_target_problem",
    "open_target",
    "piece_selection",
]
