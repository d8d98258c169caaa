"""The token that guards the console and every POST: from PGCONCORD_TOKEN, or the file named by
`[http] token_file`. Read at each guarded request, so that a token file written (or changed)
while the agent runs counts at once; compared in constant time; never logged."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from pgconcord.config import ClusterConfig

TOKEN_ENVIRONMENT_VARIABLE = "PGCONCORD_TOKEN"
COOKIE_NAME = "pgconcord_token"


def token_path(config: ClusterConfig) -> Path | None:
    """The token file the config names, relative to the config file's directory."""
    name = config.http.token_file
    if name is None:
        return None
    path = Path(name).expanduser()
    if not path.is_absolute() and config.source_path is not None:
        path = config.source_path.parent / path
    return path


def read_token(config: ClusterConfig) -> tuple[str | None, str | None]:
    """(the token, None), or (None, why there is none) in words that never hold the token."""
    from_environment = os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, "").strip()
    if from_environment:
        return from_environment, None
    path = token_path(config)
    if path is None:
        return None, f"no token: set {TOKEN_ENVIRONMENT_VARIABLE} or [http] token_file"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        return None, f"no token: cannot read http.token_file {path}: {error.strerror or error}"
    except UnicodeDecodeError:
        return None, f"no token: http.token_file {path} is not UTF-8 text"
    if not text:
        return None, f"no token: http.token_file {path} is empty"
    return text, None


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
