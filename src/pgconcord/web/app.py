"""The routes of the agent's HTTP server (a Flask application, served by server.py).

Open, as Patroni's are (machines ask them): /health, /ready/NODE, /metrics, /api/v1/status,
/api/v1/timeline, and the console's assets under /static/. Guarded by the token: the console
(GET /), the conflicts and parked changes (their rows are data), and every POST. A request
without a valid token gets 401 and changes nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from flask import Flask, Response, redirect, request
from prometheus_client.exposition import choose_encoder

from pgconcord.errors import ConfigError, NodeUnavailable
from pgconcord.parked import conflicts_and_parked, discard, parse_reference, retry_parked
from pgconcord.transport import connect, first_line
from pgconcord.web.auth import COOKIE_NAME, read_token, token_matches
from pgconcord.web.live import Live, StatusUnavailable
from pgconcord.web.metrics import registry_for
from pgconcord.web.readiness import DEFAULT_LAG_SECONDS, readiness
from pgconcord.web.timeline import Timeline

log = logging.getLogger(__name__)

STATIC_DIRECTORY = Path(__file__).parent / "static"

_NO_TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgconcord: token needed</title></head>
<body><h1>pgconcord</h1><p>{reason}</p>
<p>Open this page once as <code>/?token=YOUR_TOKEN</code> (the browser then keeps it in a
cookie), or send <code>Authorization: Bearer YOUR_TOKEN</code>. The token is the one in
<code>PGCONCORD_TOKEN</code> or in the file named by <code>[http] token_file</code> of the
agent.</p></body></html>
"""


def _json(value: Any, status: int = 200) -> Response:
    # As the CLI prints it (default=str), so that /api/v1/status is `status --json` exactly.
    return Response(
        json.dumps(value, default=str) + "\n", status=status, mimetype="application/json"
    )


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


def create_app(live: Live, timeline: Timeline) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC_DIRECTORY), static_url_path="/static")
    registry = registry_for(live)

    def refusal() -> str | None:
        """Why the request may not go on (no token, a wrong one); None: it may."""
        expected, missing = read_token(live.agent.config)
        if expected is None:
            return f"{missing}: the console and every POST are refused until one is set"
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and token_matches(expected, given.strip()):
            return None
        cookie = request.cookies.get(COOKIE_NAME)
        if token_matches(expected, cookie):
            # A cookie goes with any request the browser makes to this address, also from
            # another site's page: a POST is only taken from this server's own pages.
            origin = request.headers.get("Origin")
            if request.method == "POST" and origin not in (None, request.host_url.rstrip("/")):
                return "a POST authorized by the cookie must come from the console's own page"
            return None
        return "a valid token is needed (Authorization: Bearer TOKEN)"

    def guarded(view: Callable[..., Response]) -> Callable[..., Response]:
        def checked(**arguments: Any) -> Response:
            reason = refusal()
            if reason is not None:
                return _error(reason, 401)
            return view(**arguments)

        checked.__name__ = view.__name__
        return checked

    # -- open: for machines --------------------------------------------------------------------

    @app.get("/health")
    def health() -> Response:
        problems = live.health_problems()
        if problems:
            return _json({"status": "failing", "problems": problems}, 503)
        return _json({"status": "ok"})

    @app.get("/ready/<node>")
    def ready(node: str) -> Response:
        try:
            live.agent.config.node_by_name(node)
        except ConfigError as error:
            return _json({"node": node, "ready": False, "reasons": [str(error)]}, 404)
        text = request.args.get("lag")
        try:
            lag = DEFAULT_LAG_SECONDS if text is None else float(text)
            if not lag >= 0:
                raise ValueError
        except ValueError:
            return _json(
                {"node": node, "ready": False, "reasons": [f"lag={text!r}: not seconds >= 0"]},
                400,
            )
        try:
            reading = live.reading()
        except StatusUnavailable as error:
            return _json({"node": node, "ready": False, "reasons": [str(error)]}, 503)
        result = readiness(reading.status, node, lag)
        return _json(result.to_json(), 200 if result.ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        # Prometheus' text format, or OpenMetrics when the scraper asks for it.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(registry), content_type=content_type)

    @app.get("/api/v1/status")
    def status() -> Response:
        text = request.args.get("lag")  # as `status --lag SECONDS`: the threshold of problems
        try:
            threshold = None if text is None else float(text)
            if threshold is not None and not threshold >= 0:
                raise ValueError
        except ValueError:
            return _error(f"lag={text!r}: not seconds >= 0", 400)
        try:
            reading = live.reading()
        except StatusUnavailable as error:
            return _error(str(error), 503)
        return _json(live.status_json(reading, lag_threshold_seconds=threshold))

    @app.get("/api/v1/timeline")
    def timeline_view() -> Response:
        return _json(timeline.to_json())

    # -- guarded: data, actions and the console ---------------------------------------------

    @app.get("/api/v1/conflicts")
    @guarded
    def conflicts() -> Response:
        try:
            records, unreachable = conflicts_and_parked(live.agent.config)
        except psycopg.Error as error:  # a node lost halfway through
            return _error(f"the conflicts could not be read: {first_line(error)}", 503)
        response = _json(records)
        if unreachable:  # the list is `conflicts --json`'s; what it misses is said beside it
            response.headers["Pgconcord-Unreachable"] = "; ".join(unreachable)
        return response

    def parked_reference(reference: str) -> tuple[Any, int] | Response:
        try:
            return parse_reference(live.agent.config, reference)
        except ValueError as error:
            return _error(str(error), 404)
        except ConfigError as error:
            return _error(f"{reference}: {error}", 404)

    @app.post("/api/v1/conflicts/<reference>/retry")
    @guarded
    def retry(reference: str) -> Response:
        found = parked_reference(reference)
        if isinstance(found, Response):
            return found
        node, number = found
        try:
            report = retry_parked(node, number)
        except NodeUnavailable as error:
            return _error(str(error), 503)
        except psycopg.Error as error:
            return _error(f"{reference}: {first_line(error)}", 503)
        if not report.retried and not report.still_parked:
            return _error(f"{reference} is not a parked change", 404)
        body = {
            "ref": reference,
            "action": "retry",
            "done": not report.still_parked,
            "applied": [f"{node.name}:{each}" for each in report.retried],
            "still_parked": {f"{node.name}:{k}": v for k, v in report.still_parked.items()},
        }
        if report.still_parked:
            log.info("http: retry of %s: still parked", reference)
            return _json(body, 409)
        log.info("http: parked change %s applied by a retry", reference)
        return _json(body)

    @app.post("/api/v1/conflicts/<reference>/discard")
    @guarded
    def discard_view(reference: str) -> Response:
        found = parked_reference(reference)
        if isinstance(found, Response):
            return found
        node, number = found
        try:
            with connect(node) as connection:
                done = discard(connection, number)
        except NodeUnavailable as error:
            return _error(str(error), 503)
        except psycopg.Error as error:
            return _error(f"{reference}: {first_line(error)}", 503)
        if not done:
            return _error(f"{reference} is not a parked change", 404)
        log.info("http: parked change %s discarded", reference)
        return _json({"ref": reference, "action": "discard", "done": True})

    @app.get("/")
    def console() -> Any:
        given = request.args.get("token")
        if given is not None:
            expected, missing = read_token(live.agent.config)
            if expected is None or not token_matches(expected, given):
                wrong = missing or "that token is not the agent's"
                return Response(_NO_TOKEN_PAGE.format(reason=wrong), 401, mimetype="text/html")
            # Into a cookie the page's scripts cannot read, and out of the address bar.
            response = redirect("/", 303)
            response.set_cookie(COOKIE_NAME, given, httponly=True, samesite="Strict", path="/")
            return response
        reason = refusal()
        if reason is not None:
            return Response(_NO_TOKEN_PAGE.format(reason=reason), 401, mimetype="text/html")
        page = app.send_static_file("index.html")
        page.headers["Cache-Control"] = "no-store"
        return page

    @app.errorhandler(404)
    def not_found(_exception: Exception) -> Response:
        return _error(f"no such resource: {request.path}", 404)

    @app.errorhandler(405)
    def wrong_method(_exception: Exception) -> Response:
        return _error(f"{request.method} is not allowed on {request.path}", 405)

    @app.errorhandler(500)
    def failed(_exception: Exception) -> Response:  # Flask has logged it with its traceback
        return _error(f"internal error serving {request.path}: see the agent's log", 500)

    return app
