-- pgconcord catalog, version 10: a table's conflicts can be resolved by the user's function.

-- 'package.module:function', imported by the agent that applies changes here (README: "Your
-- own resolver"). NULL: the table's policy decides alone.
ALTER TABLE pgconcord.replicated_table ADD COLUMN resolver text;
