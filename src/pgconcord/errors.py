"""The small exception tree the CLI turns into one line and an exit code."""


class PgconcordError(Exception):
    """Base of every error pgconcord raises on purpose; its text is shown to the user as is."""

    exit_code = 1


class ConfigError(PgconcordError):
    """The cluster file is unreadable, malformed or inconsistent."""

    exit_code = 2


class NodeUnavailable(PgconcordError):
    """A node cannot be reached right now (network, server down, its session lost, a refused
    login); retry later. Any other database error of a reachable node is not this."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


class SchemaError(PgconcordError):
    """A table cannot be replicated as it is (no primary key, missing table or column, type)."""


class FatalError(PgconcordError):
    """Something is wrong that retrying will not fix; the agent stops."""


class NotSetUp(PgconcordError):
    """A node's database has no pgconcord catalog: setup never ran there (or it was removed)."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node} is not set up: run pgconcord setup")
        self.node = node
