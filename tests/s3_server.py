"""A real S3-protocol server on 127.0.0.1, and a fault-injecting HTTP proxy in front of it, for tests.

Nothing here mocks the HTTP client: boto3 (or anything else) talks HTTP over real sockets.

* ``S3Server`` runs moto's standalone server (``moto.server.ThreadedMotoServer``, a werkzeug WSGI
  server in a thread of this process) on 127.0.0.1 with a free port.
* ``FaultProxy`` is a plain ``http.server.ThreadingHTTPServer`` on 127.0.0.1 that forwards every
  request to a target endpoint with ``http.client`` and relays the answer, except for GET requests of
  an object key with a queued fault (a 500, a 503 SlowDown, a dropped connection, a delay, or a body
  cut off halfway after a full ``Content-Length``).

Usage::

    import sys; sys.path.insert(0, "/work/main/tests")   # or the equivalent relative path
    from s3_server import FaultProxy, S3Server

    with S3Server() as s3, FaultProxy(s3.endpoint) as proxy:
        client = s3.client(proxy.endpoint, retries={"total_max_attempts": 1})
        client.create_bucket(Bucket="b")
        client.put_object(Bucket="b", Key="k", Body=b"data")
        proxy.fail("k", "500", "truncate")
        ...

Notes:

* moto keeps its state in process-global backends, so every ``S3Server`` in a process (and any
  ``moto.mock_aws`` in the same process) sees the same buckets. ``S3Server.reset()`` wipes them all.
* botocore's client option ``retries={"max_attempts": N}`` counts *retries*, not attempts: N=1 means
  up to two requests. For "exactly one request, no retry" use ``{"total_max_attempts": 1}``.
* moto does not verify request signatures (unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is set); the proxy
  forwards the client's ``Host`` and ``Authorization`` headers unchanged anyway, so a signed request
  stays valid as signed.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import threading
import time
import urllib.parse
import uuid
from collections import defaultdict, deque
from typing import Any, Self

__all__ = ["FAULTS", "FaultProxy", "S3Server", "make_client"]

ACCESS_KEY = "test"
SECRET_KEY = "test"
REGION = "us-east-1"


def make_client(endpoint: str, **config: Any):
    """A boto3 S3 client for ``endpoint``: path-style addressing, us-east-1, key "test"/"test".

    ``config`` goes to ``botocore.config.Config`` and overrides the defaults here (short timeouts,
    no proxies from the environment, path-style addressing).
    """
    import boto3
    from botocore.config import Config

    _refuse_in_process_mock()
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "connect_timeout": 2,
        "read_timeout": 5,
        # An empty mapping (not None) keeps HTTP(S)_PROXY in the environment from hijacking 127.0.0.1.
        "proxies": {},
    }
    options.update(config)
    global _session
    with _session_lock:  # a boto3 Session is not thread-safe; sharing one reuses its loaded service models
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(**options),
        )


_session = None
_session_lock = threading.Lock()


def _refuse_in_process_mock() -> None:
    """Fail loudly if moto's in-process botocore stub is active: requests would then never reach a socket."""
    try:
        from moto.core.models import botocore_stubber
    except ImportError:  # pragma: no cover - moto layout changed; nothing to check
        return
    if getattr(botocore_stubber, "enabled", False):
        raise RuntimeError("moto.mock_aws is active in this process; it would intercept boto3 before any HTTP is sent")


class S3Server:
    """moto's standalone S3-protocol server on 127.0.0.1, as a context manager."""

    def __init__(self, port: int = 0) -> None:
        self._port = port  # 0: the kernel picks a free port at bind time, no race
        self._server = None
        self.endpoint = ""

    def start(self) -> Self:
        from moto.server import ThreadedMotoServer

        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:
            # Otherwise werkzeug installs its own stderr handler and logs one line per request.
            werkzeug_log.setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port, verbose=False)
        # ThreadedMotoServer.start() waits forever if the bind fails; run it in a helper thread and bound the wait.
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout=10)
        if starter.is_alive():
            raise RuntimeError(f"moto server did not start on 127.0.0.1 port {self._port or '(any)'}")
        host, port = server.get_host_and_port()
        self._server = server
        self.endpoint = f"http://{host}:{port}"
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _ = self._request("GET", "/moto-api/data.json")
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server at {self.endpoint} is not answering")
            time.sleep(0.05)

    def _request(self, method: str, path: str) -> tuple[int, bytes]:
        parsed = urllib.parse.urlsplit(self.endpoint)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
        try:
            conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()

    def reset(self) -> None:
        """Delete every bucket and object (all of moto's in-process state), over HTTP."""
        status, body = self._request("POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset failed: {status} {body[:200]!r}")

    def client(self, endpoint: str | None = None, **config: Any):
        """A boto3 S3 client for this server, or for ``endpoint`` (e.g. a ``FaultProxy`` in front of it)."""
        return make_client(endpoint or self.endpoint, **config)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
    "<RequestId>{request_id}</RequestId></Error>"
)
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
FAULTS = ("500", "503", "drop", "slow:SECONDS", "truncate")

# Headers that describe one hop, not the message; never forwarded in either direction.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


def _check_fault(fault: str) -> str:
    if fault in ("500", "503", "drop", "truncate"):
        return fault
    if fault.startswith("slow:"):
        seconds = float(fault[len("slow:") :])
        if seconds < 0:
            raise ValueError(f"negative delay in fault {fault!r}")
        return fault
    raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may sit idle on its socket before the handler gives up
    server: _ProxyHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        self.close_connection = True
        proxy = self.server.proxy
        body = self._read_body()
        split = urllib.parse.urlsplit(self.path)
        key = _object_key(split.path)
        fault = proxy._record_and_pop(self.command, key)

        if fault in _ERRORS:
            self._send_error_xml(fault, split.path)
            return
        if fault == "drop":
            # No status line, nothing: the handler returns and the server closes the socket.
            self.wfile.flush()
            return
        if fault is not None and fault.startswith("slow:"):
            proxy._closing.wait(float(fault[len("slow:") :]))

        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as exc:
            self._send_plain(502, "Bad Gateway", f"proxy could not reach {proxy.target}: {exc}".encode())
            return

        self.send_response_only(status, reason)
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        for name, value in headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and not no_body):
                continue
            self.send_header(name, value)
        if not no_body:
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if no_body:
            return
        if fault == "truncate":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            # Close now, with a full Content-Length promised and half of it sent.
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers, dropped
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        target = urllib.parse.urlsplit(self.server.proxy.target)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=self.server.proxy.upstream_timeout)
        try:
            # Keep the client's Host (and every other end-to-end header) as sent: it is part of the signature.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lowered = name.lower()
                if lowered in _HOP_BY_HOP or lowered == "content-length":
                    continue
                conn.putheader(name, value)
            if body or self.command in ("PUT", "POST", "PATCH") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _send_error_xml(self, fault: str, path: str) -> None:
        status, reason, code, message = _ERRORS[fault]
        request_id = uuid.uuid4().hex[:16].upper()
        payload = b"" if self.command == "HEAD" else _ERROR_XML.format(
            code=code, message=message, resource=path, request_id=request_id
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _send_plain(self, status: int, reason: str, payload: bytes) -> None:
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle


def _object_key(path: str) -> str | None:
    """The percent-decoded object key of a path-style request path (``/bucket/key``); None for bucket requests."""
    parts = path.lstrip("/").split("/", 1)
    if len(parts) < 2 or parts[1] == "":
        return None
    return urllib.parse.unquote(parts[1])


class _ProxyHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (as fault tests make them do) is expected; stay quiet.
        pass


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target`` that injects queued faults into GETs of object keys."""

    def __init__(self, target: str, upstream_timeout: float = 10.0) -> None:
        self.target = target.rstrip("/")
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._faults: dict[str, deque[str]] = defaultdict(deque)
        self._requests: list[tuple[str, str | None]] = []
        self._closing = threading.Event()
        self._server: _ProxyHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> Self:
        self._closing.clear()
        self._server = _ProxyHTTPServer(self)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # wakes any "slow:" sleeps
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail(self, key: str, *faults: str) -> None:
        """Queue ``faults`` for the next GET requests of object ``key``, one fault per request, in order."""
        checked = [_check_fault(f) for f in faults]
        with self._lock:
            self._faults[key].extend(checked)

    def faults_left(self, key: str) -> int:
        """How many queued faults for ``key`` have not been used yet."""
        with self._lock:
            return len(self._faults.get(key, ()))

    def clear(self) -> None:
        """Forget every queued fault and every recorded request."""
        with self._lock:
            self._faults.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        """A snapshot of the (method, object key or None) of every request seen, in arrival order."""
        with self._lock:
            return list(self._requests)

    def _record_and_pop(self, method: str, key: str | None) -> str | None:
        with self._lock:
            self._requests.append((method, key))
            if method != "GET" or key is None:
                return None
            queue = self._faults.get(key)
            return queue.popleft() if queue else None
