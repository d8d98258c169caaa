-- pgconcord catalog, version 6: a source transaction is parked, and retried, as a whole.

-- The ordering id of the source transaction a parked change belonged to (see reader.py), so
-- that its changes are applied again together, all or nothing.
ALTER TABLE pgconcord.parked_change ADD COLUMN transaction_order bigint;
