"""Found by the review of f152145 (issue 8): ways an application role, or the agent role, could
get rights it should not have through pgconcord, and other broken promises; each failed then."""

from __future__ import annotations

import psycopg
import pytest
from harness import AGENT_ROLE, Cluster

SCHEMA = "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int NOT NULL)"

# A function the application role owns; whoever runs it leaves their name behind, and the
# name of the node if they may read pgconcord's own tables (the application role may not).
SPY = """
CREATE TABLE public.spied (who text);
CREATE FUNCTION public.spy() RETURNS boolean LANGUAGE plpgsql AS $body$
BEGIN
    INSERT INTO public.spied VALUES (current_user::pg_catalog.text);
    BEGIN
        INSERT INTO public.spied SELECT pg_catalog.concat('read pgconcord.local_node: ', name)
          FROM pgconcord.local_node;
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    RETURN true;
END
$body$;
"""


def prepared(cluster: Cluster, extra: str = "") -> Cluster:
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
        cluster.execute(name, SPY)
        if extra:
            cluster.execute(name, extra)
    cluster.setup()
    return cluster


def spied(cluster: Cluster, name: str) -> list[str]:
    return [str(row[0]) for row in cluster.admin_query(name, "SELECT who FROM spied")]


def test_a_temporary_domain_named_text_runs_app_code_in_the_event_trigger_as_pgconcord(
    system_cluster: Cluster,
) -> None:
    """capture_schema_change() is SECURITY DEFINER without a SET clause: its DECLARE section
    names the type `text`, which PostgreSQL looks up in the caller's search_path when it
    compiles the function, and pg_temp is searched first for types. A domain pg_temp.text
    with a CHECK calling the application's function makes the default's assignment run that
    function with the rights of pgconcord's schema owner."""
    cluster = prepared(system_cluster)
    with cluster.connect("north") as connection:
        connection.execute("CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (public.spy())")
        connection.execute("CREATE TABLE public.more (id int PRIMARY KEY)")
    seen = spied(cluster, "north")
    assert AGENT_ROLE not in seen and not any(s.startswith("read") for s in seen), seen


MOOD = (
    "CREATE TYPE public.mood AS ENUM ('calm');"
    " CREATE FUNCTION public.mood_json(public.mood) RETURNS json LANGUAGE plpgsql AS"
    " $body$ BEGIN PERFORM public.spy(); RETURN to_json($1::text); END $body$"
)
MOOD_CAST = "CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood)"


def test_a_cast_to_json_cannot_run_app_code_in_the_capture_trigger_as_pgconcord(
    system_cluster: Cluster,
) -> None:
    """The generated capture function (SECURITY DEFINER) logs to_jsonb(NEW); to_jsonb calls a
    cast to json of a user-defined type, by oid: the pinned search_path does not help. The
    application role owns its enum type, so it may create that cast with its own function:
    setup refuses such a cast, and the event trigger refuses one made later."""
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
        cluster.execute(name, SPY)
        cluster.execute(name, MOOD)
        cluster.execute(name, "CREATE TABLE public.feelings (id int PRIMARY KEY, m public.mood)")
    cluster.execute("north", MOOD_CAST)
    refused = cluster.cli("setup")
    assert refused.returncode != 0
    assert "node north" in refused.stderr and "mood_json" in refused.stderr, refused.stderr
    cluster.execute("north", "DROP CAST (public.mood AS json)")
    cluster.setup()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="CREATE CAST"):
        cluster.execute("north", MOOD_CAST)
    cluster.execute("north", "INSERT INTO feelings VALUES (1, 'calm')")
    seen = spied(cluster, "north")
    assert AGENT_ROLE not in seen and not any(s.startswith("read") for s in seen), seen


def test_a_replayed_schema_change_cannot_reset_role_to_the_agent(system_cluster: Cluster) -> None:
    """Peers run a schema change with SET LOCAL ROLE author; any function the statement calls
    (a CHECK being validated, a volatile DEFAULT filling a new column) may RESET ROLE and go on
    as the agent's role: pgconcord's tables, replica mode, every table owner it belongs to."""
    cluster = prepared(system_cluster)
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    cluster.sync()
    cluster.execute(
        "north",
        "CREATE FUNCTION public.probe(integer) RETURNS boolean LANGUAGE plpgsql AS $body$"
        " BEGIN RESET ROLE; RETURN public.spy(); END $body$",
    )
    cluster.execute("north", "ALTER TABLE accounts ADD CONSTRAINT probed CHECK (public.probe(id))")
    cluster.sync()
    cluster.sync()
    seen = spied(cluster, "south")
    assert AGENT_ROLE not in seen and not any(s.startswith("read") for s in seen), seen


def test_the_agent_role_cannot_make_itself_superuser_through_its_event_trigger_functions(
    system_cluster: Cluster,
) -> None:
    """The event triggers a superuser creates call functions the agent's role owns (it owns the
    pgconcord schema): it can replace them with SECURITY INVOKER code, which then runs as
    whichever superuser next changes the schema anywhere in the database."""
    cluster = prepared(system_cluster)
    try:
        with psycopg.connect(cluster.dsns["north"], autocommit=True) as agent_session:
            agent_session.execute(
                "CREATE OR REPLACE FUNCTION pgconcord.capture_schema_change()"
                " RETURNS event_trigger LANGUAGE plpgsql AS $body$ BEGIN"
                " IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN"
                f" ALTER ROLE {AGENT_ROLE} SUPERUSER; END IF; END $body$"
            )
        cluster.admin_execute("north", "CREATE TABLE public.by_the_dba (id int PRIMARY KEY)")
        became = cluster.admin_value(
            "north", "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (AGENT_ROLE,)
        )
        assert not became, f"{AGENT_ROLE} made itself a superuser"
    finally:
        cluster.admin_execute("north", f"ALTER ROLE {AGENT_ROLE} NOSUPERUSER")


def test_a_schema_change_parked_for_a_missing_role_does_not_stall_the_origin(
    system_cluster: Cluster,
) -> None:
    """A schema change made by a role peers lack is parked (RoleMissing); the data changes of
    the same table that follow carry its new column. They must wait (parked, or held behind
    it) without stopping the rest of the origin's stream, and arrive after the retry."""
    cluster = prepared(system_cluster, "CREATE TABLE public.other (id int PRIMARY KEY)")
    role = f"clerk_{cluster.database}"
    cluster.admin_execute(
        "north",
        f'CREATE ROLE "{role}" LOGIN; GRANT app TO "{role}"; GRANT "{role}" TO pgconcord_agent',
    )
    try:
        cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
        cluster.sync()
        with cluster.admin_connect("north") as connection:
            connection.execute(f'SET ROLE "{role}"')
            connection.execute("ALTER TABLE accounts ADD COLUMN note text")
        cluster.execute("north", "INSERT INTO accounts VALUES (2, 'bob', 20, 'memo')")
        cluster.execute("north", "INSERT INTO other VALUES (1)")
        synced = cluster.cli("sync")
        assert cluster.value("south", "SELECT count(*) FROM other") == 1, (
            "the origin's stream stopped behind the parked schema change",
            synced.stderr,
            [c.get("reason") for c in cluster.conflicts()],
        )
        for name in ("south", "east"):
            cluster.admin_execute(
                name,
                f'CREATE ROLE "{role}" LOGIN; GRANT app TO "{role}";'
                f' GRANT "{role}" TO pgconcord_agent',
            )
        retried = cluster.cli("conflicts", "retry")
        assert retried.returncode == 0, retried.stderr
        cluster.sync()
        cluster.assert_identical()
    finally:
        for name in cluster.names:
            cluster.admin_execute(name, f'DROP ROLE IF EXISTS "{role}"')


def test_a_role_the_agent_does_not_belong_to_can_still_create_a_table_in_a_replicated_schema(
    system_cluster: Cluster,
) -> None:
    """Before 014 the event trigger ran as the maker of the table (its owner); now it runs as
    the agent's role, which cannot put triggers on a table of a role it is not a member of:
    the CREATE TABLE itself fails, with 'permission denied for table'. Promise 9: installing
    pgconcord never makes an application's write fail (and the DBA's migrations too)."""
    cluster = prepared(system_cluster)
    role = f"reports_{cluster.database}"
    cluster.admin_execute(
        "north", f'CREATE ROLE "{role}" LOGIN; GRANT CREATE, USAGE ON SCHEMA public TO "{role}"'
    )
    failures = []
    try:
        for who in (f'SET ROLE "{role}"', "RESET ROLE"):  # another role, then the superuser
            with cluster.admin_connect("north") as connection:
                connection.execute(who)
                try:
                    connection.execute("CREATE TABLE public.made_by_other (id int PRIMARY KEY)")
                    connection.execute("DROP TABLE public.made_by_other")
                except psycopg.errors.InsufficientPrivilege as error:
                    failures.append(f"{who}: {str(error).splitlines()[0]}")
        assert not failures, failures
    finally:
        cluster.admin_execute("north", "DROP TABLE IF EXISTS public.made_by_other")
        cluster.admin_execute("north", f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_an_application_cannot_push_the_clock_past_the_end_of_bigint(
    system_cluster: Cluster,
) -> None:
    """clock_now() adds pgconcord.clock_offset_us, a placeholder setting anyone may SET. An
    application on one node sets it near the end of bigint and writes a row once: from then
    on every write of that row fails, on every node (the clock is one past the row's latest)."""
    cluster = prepared(system_cluster)
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    cluster.sync()
    # The offset that puts the clock 500 microseconds short of the end of bigint.
    with cluster.connect("north") as connection:
        connection.execute("UPDATE accounts SET balance = 10 WHERE id = 1")  # compiles capture
        connection.execute(
            "UPDATE accounts SET balance = 11 WHERE id = 1 AND set_config("
            "'pgconcord.clock_offset_us', (9223372036854775807"
            " - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - 500)::text, false)"
            " IS NOT NULL"
        )
    cluster.sync()
    # Ordinary writes at another node, with an ordinary clock: each is one past the last.
    cluster.execute(
        "south",
        "DO $body$ BEGIN FOR i IN 1..1000 LOOP"
        " UPDATE accounts SET balance = i WHERE id = 1; END LOOP; END $body$",
    )


def test_an_application_cannot_switch_off_schema_change_capture(system_cluster: Cluster) -> None:
    """pgconcord.installing, which keeps pgconcord's own statements out of the log, is a
    placeholder setting any session may SET: a table made under it is never registered,
    captured or replicated, and nothing notices (status says nothing)."""
    cluster = prepared(system_cluster)
    with cluster.connect("north") as connection:
        connection.execute("SET pgconcord.installing = 'on'")
        connection.execute("CREATE TABLE public.unseen (id int PRIMARY KEY)")
        connection.execute("RESET pgconcord.installing")
        connection.execute("INSERT INTO public.unseen VALUES (1)")
    cluster.sync()
    assert cluster.value("south", "SELECT to_regclass('public.unseen') IS NOT NULL"), (
        "a table the application made in a replicated schema is not replicated"
    )
