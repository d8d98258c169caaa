"""The HTTP server inside the agent process (`pgconcord run`): bound before replication
starts, so that an address in use is one line and a non-zero exit, and stopped with the agent.

Why Flask on waitress: the agent is threads and blocking psycopg calls, and so are the
endpoints (a status reading is psycopg); a threaded WSGI server runs them as they are, on
Linux, macOS and Windows alike, pure Python. waitress runs in a thread of ours and installs no
signal handlers (uvicorn does, and wants the main thread for them; an ASGI framework would only
hand our blocking calls to a thread pool again). Flask gives the routing, JSON, cookies and the
safe serving of the console's files."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

from pgconcord.agent import Agent
from pgconcord.config import parse_listen
from pgconcord.errors import ConfigError, PgconcordError
from pgconcord.web.app import create_app
from pgconcord.web.auth import read_token
from pgconcord.web.live import Live
from pgconcord.web.timeline import Timeline

log = logging.getLogger(__name__)

# Requests served at once: a reading of the status can wait for a node's connection timeout,
# and /health must not queue behind it.
THREADS = 8
_LOOP_SECONDS = 0.5


def _bind(host: str, port: int, listen: str) -> socket.socket:
    """A socket bound to exactly the address given (an IPv6 one for IPv6 only)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise PgconcordError(f"http: cannot listen on {listen}: {error.strerror}") from None
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    try:
        if os.name != "nt":  # elsewhere it would let another process take the port too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise PgconcordError(
            f"http: cannot listen on {listen}: {error.strerror or error}"
        ) from None
    return sock


class HttpServer:
    """A WSGI application served on one address by waitress, in a thread, with helper loops
    (the timeline's sampling) that stop with it."""

    def __init__(
        self,
        application: Any,
        listen: str,
        *,
        helpers: tuple[Any, ...] = (),
    ) -> None:
        try:
            host, port = parse_listen(listen)
        except ValueError as error:
            raise ConfigError(f"http listen address {error}") from None
        self.listen = listen
        self._socket = _bind(host, port, listen)
        self._map: dict[int, Any] = {}
        self._server = create_server(
            application,
            map=self._map,
            sockets=[self._socket],
            threads=THREADS,
            ident="pgconcord",
            clear_untrusted_proxy_headers=True,
        )
        self._helpers = helpers
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> HttpServer:
        self._threads.append(threading.Thread(target=self._serve, name="http", daemon=True))
        for helper in self._helpers:
            self._threads.append(
                threading.Thread(
                    target=helper, args=(self.stopping,), name="http helper", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        return self

    def _serve(self) -> None:
        # waitress' own run() loops until its map is empty; this loop also ends when asked to
        # from another thread (stop()), and then closes everything from the thread that owns it.
        use_poll = hasattr(select, "poll")
        try:
            while not self.stopping.is_set():
                wasyncore.loop(timeout=_LOOP_SECONDS, map=self._map, use_poll=use_poll, count=1)
        except Exception:  # replication goes on; a load balancer sees the node refuse
            log.exception("pgconcord: http: the server on %s stopped by an error", self.listen)
        finally:
            self._server.task_dispatcher.shutdown(timeout=5)
            wasyncore.close_all(self._map)

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._server.trigger.pull_trigger()  # wake the loop at once
        for thread in self._threads:
            thread.join(timeout)
        if not self._threads:
            wasyncore.close_all(self._map)


def start_http_server(agent: Agent, listen: str) -> HttpServer:
    """Serve the agent's endpoints on listen ("HOST:PORT"); PgconcordError if it cannot be
    bound. Without a token the open endpoints are served, and one line says what is refused."""
    live = Live(agent)
    timeline = Timeline(live)
    server = HttpServer(create_app(live, timeline), listen, helpers=(timeline.run,))
    _token, missing = read_token(agent.config)
    if missing is not None:
        log.warning(
            "http: %s: the console and every POST are refused until one is set"
            " (health, readiness, metrics and status are served)",
            missing,
        )
    server.start()
    log.info("http: serving health, readiness, metrics, the API and the console on %s", listen)
    return server
