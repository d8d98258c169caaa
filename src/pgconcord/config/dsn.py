"""A node's dsn: what is refused in it (a password, nothing at all), the database it names, and
the dsn as logs and status output may show it."""

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_PASSWORD_REFUSAL = "dsn contains a password; put it in ~/.pgpass or PGPASSWORD instead"
_SSL_PASSWORD_REFUSAL = (
    "dsn contains an sslpassword; pgconcord never stores passwords, "
    "use a client key without a passphrase (protected by its file permissions) instead"
)

# When libpq cannot parse a dsn its message may quote the dsn, password included, so a dsn that
# merely looks like it carries a password is refused as such instead of being echoed back.
_LOOKS_LIKE_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9_])(?:ssl)?password\s*="  # key=value form, or a URI query parameter
    r"|^\s*[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@",  # URI user:password@host
)


def _dsn_parameters(dsn: str) -> dict[str, str]:
    return {key: str(value) for key, value in conninfo_to_dict(dsn).items()}


def _dsn_problem(dsn: str) -> str | None:
    try:
        parameters = _dsn_parameters(dsn)
    except psycopg.Error as error:
        if _LOOKS_LIKE_PASSWORD.search(dsn):
            return _PASSWORD_REFUSAL
        return f"dsn is malformed: {_one_line(str(error))}"
    # An empty password is allowed: libpq then falls back to ~/.pgpass as if none was given.
    if parameters.get("password"):
        return _PASSWORD_REFUSAL
    if parameters.get("sslpassword"):
        return _SSL_PASSWORD_REFUSAL
    if not parameters:
        # Everything would come from PG* environment variables, which differ from one site to
        # the next although every site reads the same file.
        return "dsn is empty; name the database, e.g. host=... dbname=..."
    return None


def _database_identity(dsn: str) -> tuple[str, str, str]:
    parameters = _dsn_parameters(dsn)
    host = parameters.get("host") or parameters.get("hostaddr") or ""
    port = parameters.get("port") or "5432"
    # libpq's default database is the one named like the user.
    dbname = parameters.get("dbname") or parameters.get("user") or ""
    return host, port, dbname


def redacted_dsn(dsn: str) -> str:
    """Return `dsn` without its password (and sslpassword), fit for logs and status output."""
    try:
        parameters = _dsn_parameters(dsn)
    except psycopg.Error:
        # Cannot tell where a password would be in a string libpq cannot parse.
        return "<malformed dsn>"
    secrets = {"password", "sslpassword"}
    if secrets.isdisjoint(parameters):
        return dsn
    return make_conninfo(
        "", **{key: value for key, value in parameters.items() if key not in secrets}
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
