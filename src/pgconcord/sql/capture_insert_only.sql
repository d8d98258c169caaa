-- Row trigger function generated for a replicated table without a key (catalog.install_capture):
-- its rows cannot be told apart, so only inserts are replicated (logs, history), and an update
-- or delete is refused at once rather than left to make the nodes differ. The row itself
-- stands in as the change's key (captured with no key; stamp_captured.sql).
CREATE OR REPLACE FUNCTION pgconcord.{function_name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp {settings}
AS $body$
DECLARE
    {declarations}
BEGIN
    {prologue}
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'pgconcord: table %.% has no primary key, so only its inserts are'
                        ' replicated; % is refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Add a primary key, or declare a key under [replication.keys] in the'
                         ' pgconcord config, then run pgconcord setup.';
    END IF;
    INSERT INTO pgconcord.captured_change (table_id, operation, new_row)
    VALUES ({table_id}, 'I', {new_row});
    RETURN NULL;
END
$body$;
