"""Where the commands' log goes and how it looks: text for a person, or `--log-format json`, one
JSON object a line for log collectors (journald forwarders, Loki, Elasticsearch), with the
fields a line was logged with (`extra=`) as keys of their own so they can be queried."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# What every LogRecord has: anything else on a record came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def level_for(verbosity: int) -> int:
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def configure(verbosity: int, log_format: str) -> None:
    """(Re)configure the root logger; called again when a -v or --log-format comes after the
    command's name, so that the last word counts wherever it stands."""
    level = level_for(verbosity)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # psycopg warns when a pipeline ends on a lost connection; pgconcord says which node was
    # lost in its own words, once.
    logging.getLogger("psycopg").setLevel(max(level, logging.ERROR))
