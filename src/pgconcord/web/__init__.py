"""The agent's HTTP server: health, readiness and metrics for machines (load balancers,
Prometheus), the JSON API the console and scripts read, and the console itself.

The package: server (binding, starting and stopping the server inside the agent process),
app (the routes), live (the cluster's status, read at most once a second, with the agent's
heartbeats), readiness (whether a node may take traffic), timeline (the last hour of lag and
throughput per pair), metrics (the Prometheus collector), auth (the token), static/ (the
console's files).
"""

from pgconcord.web.server import HttpServer, start_http_server

__all__ = ["HttpServer", "start_http_server"]
