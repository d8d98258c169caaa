"""`pgconcord verify`: compare every replicated table across the nodes of a cluster.

The comparison reads the user's tables only, never pgconcord's change log or row versions, so
that it proves convergence independently of the machinery it checks (DESIGN.md, promise 3).

Each node is read in one REPEATABLE READ READ ONLY transaction, so every table of a node is
compared as of one moment. A table is first compared by a hash computed on each server; only
when the hashes differ are the rows streamed, as (primary key, row hash) pairs in one agreed
order, and merged in Python to name the keys that differ.
"""

from pgconcord.verify.compare import verify
from pgconcord.verify.report import EXAMPLE_KEY_LIMIT, TableDifference, VerifyReport

__all__ = ["EXAMPLE_KEY_LIMIT", "TableDifference", "VerifyReport", "verify"]
