-- pgconcord catalog, version 9: who belongs to the cluster; joins and evictions.

-- The cluster's members as this node knows them. A row's state is changed by `pgconcord join`,
-- `pgconcord part` and eviction, and spreads between nodes by the agents' purge (the row with
-- the later changed_at wins), so that a node that was down learns it too. A node without a row
-- is an active member (clusters set up before version 9). progress_at is this node's own
-- bookkeeping: when the member was last seen applying this node's changes (the eviction clock).
CREATE TABLE pgconcord.member (
    name text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('joining', 'active', 'evicted', 'parted')),
    changed_at timestamptz NOT NULL,
    reason text,
    reached_at timestamptz
);

-- A join in progress, on the joining node: the donor it copies from, the tables it created
-- from the donor's definitions and the statements (indexes, constraints) still to run on them
-- once their rows are in.
CREATE TABLE pgconcord.join_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    donor text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    created_tables text[] NOT NULL DEFAULT '{}',
    post_data text
);

-- Each run of a join copies on one snapshot of the donor; the positions the donor had applied
-- in that snapshot (its own: the snapshot itself) are where the joining node starts pulling.
CREATE TABLE pgconcord.join_attempt (
    attempt serial PRIMARY KEY,
    donor_snapshot pg_snapshot NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgconcord.join_position (
    attempt integer NOT NULL REFERENCES pgconcord.join_attempt ON DELETE CASCADE,
    origin text NOT NULL,
    applied_snapshot pg_snapshot NOT NULL,
    window_snapshot pg_snapshot,
    window_done bigint,
    PRIMARY KEY (attempt, origin)
);

-- Tables whose copy is committed (with their row versions and copy horizons): a join that is
-- run again skips them.
CREATE TABLE pgconcord.join_table (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    attempt integer NOT NULL,
    copied_rows bigint NOT NULL,
    copied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name)
);

-- Nothing is applied from a node that left the cluster, nor into this node while it is joining
-- or after it was evicted or parted: its positions would point at changes the others no longer
-- keep. New positions (setup) are refused for a parted node and on a joining one; an evicted
-- node may keep or get one (it waits unused until the node joins again). Enabled ALWAYS,
-- because changes are applied with session_replication_role = replica. The error class (55000)
-- makes the agent wait and retry with the message, not park anything.
CREATE FUNCTION pgconcord.guard_position() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    origin_state text;
    local_name text;
    local_state text;
BEGIN
    SELECT state INTO origin_state FROM pgconcord.member WHERE name = NEW.origin;
    IF origin_state = 'parted' THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('pgconcord: node %s was parted from the cluster; remove it from'
                             ' the config', NEW.origin);
    ELSIF origin_state = 'evicted' AND TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('pgconcord: node %s was evicted from the cluster; nothing is applied'
                             ' from it until `pgconcord join %s` copies it afresh',
                             NEW.origin, NEW.origin);
    END IF;
    SELECT l.name, m.state INTO local_name, local_state
      FROM pgconcord.local_node l LEFT JOIN pgconcord.member m ON m.name = l.name;
    IF local_state = 'joining' THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('pgconcord: node %s is joining; it replicates once'
                             ' `pgconcord join %s` has finished', local_name, local_name);
    ELSIF local_state = 'parted' OR (local_state = 'evicted' AND TG_OP = 'UPDATE') THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('pgconcord: node %s was %s from the cluster; `pgconcord join %s`'
                             ' brings it back with a fresh copy', local_name, local_state,
                             local_name);
    END IF;
    RETURN NEW;
END
$body$;

CREATE TRIGGER pgconcord_guard BEFORE INSERT OR UPDATE ON pgconcord.position
    FOR EACH ROW EXECUTE FUNCTION pgconcord.guard_position();
ALTER TABLE pgconcord.position ENABLE ALWAYS TRIGGER pgconcord_guard;
