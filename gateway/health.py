"""The load balancer's HTTP listener (``[[listen]] protocol = "health"``): plain HTTP/1.0,
one request per connection, answered from a route table.

``/healthz`` is 200 while this worker serves and Redis answers, 503 once the gateway is
stopping (the worker drains its sessions and keeps answering 503 here, so the balancer takes
the instance out before it goes away) or when Redis does not answer.

``/metrics`` is the Prometheus text of gateway.metrics.  Adding a route::

    from gateway import health
    health.ROUTES["/path"] = my_route     # my_route(service) -> health.Response

A route gets the worker's ``Service`` and returns a ``Response``; it runs in the
connection's greenlet and must not block for long (the request is bounded by TIMEOUT).
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("mailgate.health")

MAX_REQUEST = 8192      # request line and headers
TIMEOUT = 5.0           # to read the request and write the answer
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


def healthz(service) -> Response:
    """200 "ok" while serving; 503 with the reason while draining or without Redis."""
    if getattr(service, "draining", False):
        return Response(503, b"draining\n")
    try:
        service.redis.ping()
    except Exception as exc:  # noqa: BLE001 - any Redis failure means "not healthy"
        return Response(503, f"redis unavailable: {exc.__class__.__name__}\n".encode())
    return Response(200, b"ok\n")


def metrics(service) -> Response:
    """The Prometheus text of every worker of this master (gateway.metrics)."""
    from gateway import metrics as metrics_mod
    body, content_type = metrics_mod.render(service.directory)
    return Response(200, body, content_type)


ROUTES: dict[str, Callable[[object], Response]] = {"/healthz": healthz, "/metrics": metrics}


def parse_request(data: bytes) -> tuple[str, str] | Response:
    """(method, path) from a request head, or the error Response to send."""
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    words = line.split(b" ")
    if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
        return Response(400, b"bad request\n")
    method = words[0].decode("ascii", "replace")
    path = words[1].decode("ascii", "replace").split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return Response(405, b"only GET and HEAD\n")
    return method, path


def handler(service):
    """A callable(socket, address) answering one HTTP request on the health listener."""

    def handle(sock: socket.socket, address) -> None:
        try:
            sock.settimeout(TIMEOUT)
            head = _read_head(sock)
            parsed = parse_request(head) if head is not None else Response(400, b"bad request\n")
            method = "GET"
            if isinstance(parsed, Response):
                response = parsed
            else:
                method, path = parsed
                response = _route(service, path)
            sock.sendall(_encode(response, with_body=method != "HEAD"))
        except OSError:
            pass          # the client's socket: nobody left to answer
        finally:
            sock.close()
    return handle


def _route(service, path: str) -> Response:
    """The route's answer; a route that fails (a bug, a metrics file read while a worker
    writes or removes it) is a 500: a balancer's check is answered, never dropped."""
    route = ROUTES.get(path)
    if route is None:
        return Response(404, b"not found\n")
    try:
        return route(service)
    except Exception:  # noqa: BLE001 - never a dead worker, never an unanswered check
        log.exception("health request failed")
        return Response(500, b"internal error\n")


def _read_head(sock: socket.socket) -> bytes | None:
    """The request head up to its blank line (bounded), None when too long or cut."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data or None
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    return data


def _encode(response: Response, with_body: bool = True) -> bytes:
    reason = REASONS.get(response.status, "Status")
    head = (f"HTTP/1.0 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\n\r\n").encode()
    return head + (response.body if with_body else b"")
