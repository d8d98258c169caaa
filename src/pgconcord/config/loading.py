"""Reading the cluster file, and every problem with it as one line naming the file and the key."""

import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from pgconcord.config.dsn import _one_line
from pgconcord.config.model import _INVALID, _SELF_LOCATED, _UNKNOWN_KEY, ClusterConfig
from pgconcord.errors import ConfigError

CONFIG_ENVIRONMENT_VARIABLE = "PGCONCORD_CONFIG"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_TOML_TYPE_EXPECTED = {
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def load_config(path: str | os.PathLike[str] | None = None) -> ClusterConfig:
    """Read and validate the cluster file at `path`, or at $PGCONCORD_CONFIG when `path` is None.

    Raises ConfigError, with a one-line message naming the file, when it cannot be used.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or None
        if path is None:
            raise ConfigError(f"no config: pass --config FILE or set {CONFIG_ENVIRONMENT_VARIABLE}")
    source = os.fspath(path)
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        # utf-8-sig: Windows editors may start the file with a byte order mark TOML forbids.
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{source}: cannot read: not UTF-8 text (byte {error.start} is invalid)"
        ) from None
    config = parse_config(text, source)
    # Absolute, so that later uses do not depend on the working directory staying the same.
    return config.model_copy(update={"source_path": Path(path).absolute()})


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    """Validate the TOML `text`; `source` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(_describe_syntax_error(error, source)) from None
    try:
        return ClusterConfig.model_validate(document)
    except ValidationError as error:
        # "from None": pydantic's own message quotes the input values, dsn passwords included,
        # and a chained traceback would print it.
        raise ConfigError(_describe_validation_error(error, source)) from None


def _describe_syntax_error(error: tomllib.TOMLDecodeError, source: str) -> str:
    message = str(error)
    position = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", message)
    if position:
        reason, line, column = position.groups()
        reason = _lowercase_first(_one_line(reason))
        return f"{source}: line {line}: TOML syntax error: {reason} (column {column})"
    return f"{source}: TOML syntax error: {_lowercase_first(_one_line(message))}"


def _describe_validation_error(error: ValidationError, source: str) -> str:
    # Every error is reported on one line: the first one, which is enough to fix and retry.
    details = error.errors(include_url=False)
    description = _describe_error(details[0])
    if len(details) > 1:
        description += f" (and {len(details) - 1} more)"
    return f"{source}: {description}"


def _describe_error(detail: ErrorDetails) -> str:
    context = detail.get("ctx", {})
    location = [part for part in detail["loc"] if part != "[key]"]
    kind = detail["type"]
    if kind == _UNKNOWN_KEY:
        return (
            f"unknown key '{_render_path([*location, context['key']])}' "
            f"(expected one of: {context['allowed']})"
        )
    if kind == _SELF_LOCATED:
        return str(context["message"])
    if kind == _INVALID:
        message = str(context["message"])
        location.extend(context["subpath"])
    elif kind == "missing":
        message = "field required"
    elif kind in _TOML_TYPE_EXPECTED:
        message = f"expected {_TOML_TYPE_EXPECTED[kind]}, got {_toml_type(detail['input'])}"
        if location == ["node"] and isinstance(detail["input"], dict):
            message += "; write [[node]] (double brackets), once per node"
    elif kind == "literal_error":
        message = f"{detail['input']!r} is not allowed (expected {context['expected']})"
    elif kind == "extra_forbidden":
        return f"unknown key '{_render_path(location)}'"
    else:
        message = _lowercase_first(detail["msg"])
    if location == ["node"] and kind in ("missing", _INVALID):
        message = "at least one [[node]] table is required"
    return f"{_render_path(location)}: {message}" if location else message


def _render_path(location: Sequence[str | int]) -> str:
    """The key path as written in TOML: `node[1].dsn`, `conflict.table."public.accounts"`."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        path += f".{key}" if path else key
    return path


def _toml_type(value: object) -> str:
    # Checked in this order because bool is a subclass of int.
    names: list[tuple[type, str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        (type(None), "nothing"),
    ]
    for python_type, name in names:
        if isinstance(value, python_type):
            return name
    return "a date or time"


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]
