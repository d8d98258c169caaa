"""`pgconcord join NAME`: add a node to a running cluster with a copy of a live node.

1. Register: the node is recorded as joining on every member (each one's membership lock waits
   for a purge in progress there), so from then on every node keeps its whole change log for it.
   The joining node's old data, log and positions are discarded (an evicted or parted node
   coming back, or --discard).
2. Create the tables it lacks from the donor's definitions (pg_dump), without their indexes
   and constraints, which are built after the rows are in, as pg_dump | psql does.
3. Copy on one REPEATABLE READ snapshot of the donor, a transaction per table on the joining
   node: the rows (COPY), their versions (pgconcord.row_version, which decide later conflicts)
   and a copy horizon per origin: what the table holds of each origin's changes, which is the
   donor's position for that origin read in the same snapshot (positions commit with the rows
   they applied) and, for the donor's own changes, the snapshot itself. A run that is
   interrupted keeps the tables it committed; the next run copies the others on a new
   snapshot, and the horizons make each table skip the changes it already holds.
4. Finish: the joining node starts from the positions of its first run (the earliest), the
   same install as `setup` runs (capture, key slot, positions of the peers for it), and every
   member records it as active.
"""

from pgconcord.join.procedure import join
from pgconcord.join.report import JoinObserver, JoinReport, QuietObserver

__all__ = ["JoinObserver", "JoinReport", "QuietObserver", "join"]
