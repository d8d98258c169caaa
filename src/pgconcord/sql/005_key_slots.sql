-- pgconcord catalog, version 5: keys that do not collide between masters.

-- Each node owns a slot: its sequences hand out only values congruent to the slot modulo the
-- cluster's capacity, so serial and identity keys written on different nodes never collide.
ALTER TABLE pgconcord.local_node ADD COLUMN key_slot integer;

CREATE SEQUENCE pgconcord.unique_id_sequence;

-- A cluster-unique bigint for new tables' keys (DEFAULT pgconcord.unique_id()).
CREATE FUNCTION pgconcord.unique_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $body$
    SELECT nextval('pgconcord.unique_id_sequence')
$body$;
