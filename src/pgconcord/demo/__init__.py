"""`pgconcord demo`: the embedded default. Starts throwaway local PostgreSQL nodes, replicates a
live shop workload between them (with rows deliberately edited on several nodes at once), shows
it as it happens, proves the nodes converged with `verify`, and removes everything it started.

The parts: the workload each node runs (workload), the live view of the cluster while it runs
(view), the summary at the end (summary), and the run that ties them together (driver).
"""

from pgconcord.demo.driver import run_demo
from pgconcord.demo.summary import _example, _pick_examples
from pgconcord.demo.workload import ConflictRound

__all__ = ["ConflictRound", "_example", "_pick_examples", "run_demo"]
