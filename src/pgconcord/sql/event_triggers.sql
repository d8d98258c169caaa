-- The event triggers that capture schema changes, for a node where pgconcord's role is not a
-- superuser: `pgconcord grant ROLE` prints this for a superuser to run (after setup). The
-- functions the triggers call live in a schema of the superuser's, so that pgconcord's role,
-- which owns everything in schema pgconcord, cannot change what runs for every schema change
-- made in this database. They run as the caller (SECURITY INVOKER: whatever the caller's
-- search_path resolves here runs with the caller's own rights) and hand the work to
-- pgconcord.capture_schema_*_of(), which log only the statement running, as its role. A
-- superuser's own schema changes are left alone (they would run code pgconcord's role
-- controls as a superuser): make them as the application's role to have them replicated.
CREATE SCHEMA IF NOT EXISTS pgconcord_event;
REVOKE ALL ON SCHEMA pgconcord_event FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgconcord_event.capture_schema_change() RETURNS event_trigger
LANGUAGE plpgsql AS $body$
BEGIN
    IF pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'off' THEN
        PERFORM pgconcord.capture_schema_change_of(pg_catalog.current_setting('search_path'));
    END IF;
END
$body$;

CREATE OR REPLACE FUNCTION pgconcord_event.capture_schema_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $body$
BEGIN
    IF pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'off' THEN
        PERFORM pgconcord.capture_schema_drop_of(tg_tag,
                                                 pg_catalog.current_setting('search_path'));
    END IF;
END
$body$;
