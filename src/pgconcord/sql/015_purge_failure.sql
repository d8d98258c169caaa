-- pgconcord catalog, version 15: why this node's change log could not be purged, for `status`.
--
-- The agent (and sync) purge each node's log now and then; when that fails the log only grows,
-- and nobody reads the agent's log until the disk is full. The failure is kept here, on the node
-- itself (it was reachable: the purge got as far as failing), so that `pgconcord status`, run
-- anywhere, says so. A purge that works again removes the row.
CREATE TABLE pgconcord.purge_failure (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    reason text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),    -- the first failure of this run of failures
    failed_at timestamptz NOT NULL DEFAULT now() -- the latest
);
