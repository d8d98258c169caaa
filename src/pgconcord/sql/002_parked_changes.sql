-- pgconcord catalog, version 2: changes that could not be applied are parked, not stalled on.

-- A change from a peer that failed to apply here (a constraint, a type, a missing column), or
-- that waits behind such a change of the same row from the same origin. The stream goes on;
-- `pgconcord conflicts retry` applies them again, `discard` drops one (the record stays).
CREATE TABLE pgconcord.parked_change (
    id bigserial PRIMARY KEY,
    parked_at timestamptz NOT NULL DEFAULT now(),
    origin text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    row_key jsonb NOT NULL,
    operation "char" NOT NULL,
    clock bigint NOT NULL,
    previous_clock bigint,
    previous_origin text,
    new_row jsonb,
    reason text NOT NULL,
    state text NOT NULL DEFAULT 'parked' CHECK (state IN ('parked', 'retried', 'discarded')),
    resolved_at timestamptz
);
CREATE INDEX parked_change_waiting ON pgconcord.parked_change (origin, schema_name, table_name, row_key)
    WHERE state = 'parked';
