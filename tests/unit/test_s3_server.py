"""The S3 test infrastructure in tests/s3_server.py: a real moto server on 127.0.0.1, a fault proxy in front."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import ClassVar

import pytest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_server import FaultProxy, S3Server

BUCKET = "infra-bucket"
NO_RETRY = {"total_max_attempts": 1}  # exactly one request; botocore's {"max_attempts": 1} means one *retry*


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def proxy(s3):
    s3.reset()
    with FaultProxy(s3.endpoint) as p:
        yield p


@pytest.fixture
def bucket(s3, proxy):
    s3.client(proxy.endpoint).create_bucket(Bucket=BUCKET)
    proxy.clear()
    return BUCKET


def _client(s3, proxy, **config):
    config.setdefault("read_timeout", 2)
    config.setdefault("connect_timeout", 1)
    return s3.client(proxy.endpoint, **config)


def _raw(endpoint: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    parsed = urllib.parse.urlsplit(endpoint)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=2)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _gets(proxy, key):
    return sum(1 for method, k in proxy.requests if method == "GET" and k == key)


def test_endpoints_are_real_sockets_on_loopback(s3, proxy):
    for endpoint in (s3.endpoint, proxy.endpoint):
        parsed = urllib.parse.urlsplit(endpoint)
        assert parsed.scheme == "http" and parsed.hostname == "127.0.0.1" and parsed.port
        status, _, body = _raw(endpoint, "GET", "/")
        assert status == 200
        assert b"ListAllMyBucketsResult" in body
    assert proxy.requests == [("GET", None)]


def test_crud_through_proxy(s3, proxy):
    client = _client(s3, proxy)
    client.create_bucket(Bucket=BUCKET)
    payloads = {f"dir/obj-{i}.bin": bytes(range(i, i + 64)) * (i + 1) for i in range(5)}
    for key, data in payloads.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)

    keys, pages, token = [], 0, None
    while True:
        kwargs = {"Bucket": BUCKET, "Prefix": "dir/", "MaxKeys": 2}
        if token:
            kwargs["ContinuationToken"] = token
        page = client.list_objects_v2(**kwargs)
        pages += 1
        assert page["KeyCount"] <= 2
        keys += [obj["Key"] for obj in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert pages == 3
    assert keys == sorted(payloads)

    key = "dir/obj-3.bin"
    assert client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == len(payloads[key])
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == payloads[key]
    ranged = client.get_object(Bucket=BUCKET, Key=key, Range="bytes=10-19")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes 10-19/{len(payloads[key])}"
    assert ranged["Body"].read() == payloads[key][10:20]

    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(ClientError) as info:
        client.head_object(Bucket=BUCKET, Key=key)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    seen = proxy.requests
    assert ("PUT", None) in seen  # CreateBucket
    assert sum(1 for r in seen if r == ("GET", None)) == 3  # the three list pages
    assert ("HEAD", key) in seen and ("GET", key) in seen and ("DELETE", key) in seen
    assert sum(1 for m, k in seen if m == "PUT" and k in payloads) == 5


def test_keys_are_percent_decoded(s3, proxy, bucket):
    client = _client(s3, proxy)
    key = "a dir/ünï+cödé%20.txt"
    client.put_object(Bucket=bucket, Key=key, Body=b"x")
    proxy.fail(key, "500")
    with pytest.raises(ClientError):
        _client(s3, proxy, retries=NO_RETRY).get_object(Bucket=bucket, Key=key)
    assert proxy.faults_left(key) == 0
    assert ("PUT", key) in proxy.requests


class _Echo(http.server.BaseHTTPRequestHandler):
    """Upstream stand-in that records exactly what the proxy sent it."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def log_message(self, *args):
        pass

    def _any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((self.command, self.path, dict(self.headers.items()), body))
        payload = b"" if self.command == "HEAD" else b"echo:" + body
        self.send_response(200)
        self.send_header("Content-Length", "5" if self.command == "HEAD" else str(len(payload)))
        self.send_header("x-amz-meta-a", "1")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any


def test_proxy_forwards_requests_verbatim():
    """Host, Authorization and the signed x-amz-* headers reach the upstream unchanged, so signatures stay valid."""
    _Echo.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
            url = urllib.parse.urlsplit(p.endpoint)
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
            headers = {"Host": "example.test:1234", "Authorization": "AWS4-HMAC-SHA256 Credential=x", "x-amz-date": "d"}
            conn.request("PUT", "/bkt/some%20key?partNumber=1&uploadId=u", body=b"payload", headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == b"echo:payload"
            assert resp.getheader("x-amz-meta-a") == "1" and resp.getheader("Connection") == "close"
            conn.close()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
            conn.request("HEAD", "/bkt/k", headers={"Range": "bytes=0-1"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Length") == "5" and resp.read() == b""
            conn.close()
            assert p.requests == [("PUT", "some key"), ("HEAD", "k")]
    finally:
        upstream.shutdown()
        upstream.server_close()
    (method, path, sent, body), (head_method, _, head_sent, _) = _Echo.seen
    assert (method, path, body) == ("PUT", "/bkt/some%20key?partNumber=1&uploadId=u", b"payload")
    assert sent["Host"] == "example.test:1234"
    assert sent["Authorization"] == "AWS4-HMAC-SHA256 Credential=x" and sent["x-amz-date"] == "d"
    assert head_method == "HEAD" and head_sent["Range"] == "bytes=0-1"


@pytest.mark.parametrize(("fault", "status", "code"), [("500", 500, "InternalError"), ("503", 503, "SlowDown")])
def test_an_error_fault_without_retry_is_that_error(s3, proxy, bucket, fault, status, code):
    client = _client(s3, proxy, retries=NO_RETRY)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", fault)
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=bucket, Key="k")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert info.value.response["Error"]["Code"] == code
    assert _gets(proxy, "k") == 1
    assert proxy.faults_left("k") == 0
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"


def test_max_attempts_1_means_one_retry(s3, proxy, bucket):
    """botocore's legacy option counts retries: {"max_attempts": 1} makes two requests."""
    client = _client(s3, proxy, retries={"max_attempts": 1})
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", "500")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    assert _gets(proxy, "k") == 2
    proxy.fail("k", "500", "500")
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=bucket, Key="k")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert _gets(proxy, "k") == 4


def test_default_retries_recover_after_one_500(s3, proxy, bucket):
    client = _client(s3, proxy)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", "500")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    assert _gets(proxy, "k") == 2
    assert proxy.faults_left("k") == 0


def test_drop_is_a_connection_error(s3, proxy, bucket):
    client = _client(s3, proxy, retries=NO_RETRY)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", "drop")
    with pytest.raises(ConnectionClosedError):
        client.get_object(Bucket=bucket, Key="k")
    assert _gets(proxy, "k") == 1
    # The default retry policy gets past a dropped connection.
    proxy.fail("k", "drop")
    assert _client(s3, proxy).get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    assert _gets(proxy, "k") == 3


def test_truncate_fails_the_body_read(s3, proxy, bucket):
    client = _client(s3, proxy, retries=NO_RETRY)
    data = bytes(range(256)) * 40
    client.put_object(Bucket=bucket, Key="k", Body=data)
    proxy.fail("k", "truncate")
    response = client.get_object(Bucket=bucket, Key="k")
    assert response["ContentLength"] == len(data)  # the full length is promised
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        response["Body"].read()
    # Raw HTTP view of the same fault: full Content-Length, half the bytes, then EOF.
    proxy.fail("k", "truncate")
    url = urllib.parse.urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"}))
    with socket.create_connection((url.hostname, url.port), timeout=2) as sock:
        request = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n"
        sock.sendall(request.encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"content-length: {len(data)}".encode() in head.lower()
    assert body == data[: len(data) // 2]


def test_slow_delays_then_forwards(s3, proxy, bucket):
    client = _client(s3, proxy, retries=NO_RETRY)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", "slow:0.5")
    start = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    assert time.monotonic() - start >= 0.5
    start = time.monotonic()
    client.get_object(Bucket=bucket, Key="k")["Body"].read()
    assert time.monotonic() - start < 0.5


def test_slow_past_read_timeout_times_out(s3, proxy, bucket):
    client = _client(s3, proxy, retries=NO_RETRY, read_timeout=0.3)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.fail("k", "slow:1")
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=bucket, Key="k")


def test_faults_are_consumed_in_order_per_key(s3, proxy, bucket):
    client = _client(s3, proxy, retries=NO_RETRY)
    for key in ("k", "other"):
        client.put_object(Bucket=bucket, Key=key, Body=b"0123456789")
    proxy.fail("k", "500", "503")
    proxy.fail("k", "truncate")
    assert proxy.faults_left("k") == 3
    assert proxy.faults_left("other") == 0

    # Other keys, and non-GET requests of the key, leave the queue alone.
    assert client.get_object(Bucket=bucket, Key="other")["Body"].read() == b"0123456789"
    client.head_object(Bucket=bucket, Key="k")
    assert proxy.faults_left("k") == 3

    with pytest.raises(ClientError) as first:
        client.get_object(Bucket=bucket, Key="k")
    assert first.value.response["Error"]["Code"] == "InternalError"
    assert proxy.faults_left("k") == 2
    with pytest.raises(ClientError) as second:
        client.get_object(Bucket=bucket, Key="k")
    assert second.value.response["Error"]["Code"] == "SlowDown"
    assert proxy.faults_left("k") == 1
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        client.get_object(Bucket=bucket, Key="k")["Body"].read()
    assert proxy.faults_left("k") == 0
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"
    assert _gets(proxy, "k") == 4


def test_unknown_fault_is_refused(proxy):
    for bad in ("404", "slow", "slow:abc", "slow:-1", "Drop"):
        with pytest.raises(ValueError):
            proxy.fail("k", bad)
    assert proxy.faults_left("k") == 0


def test_requests_list_is_thread_safe(s3, proxy, bucket):
    client = _client(s3, proxy)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    errors = []

    def worker():
        try:
            for _ in range(5):
                client.get_object(Bucket=bucket, Key="k")["Body"].read()
        except (BotoCoreError, ClientError) as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert _gets(proxy, "k") == 20


def test_reset_empties_the_server(s3, proxy, bucket):
    client = _client(s3, proxy)
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    s3.reset()
    assert client.list_buckets()["Buckets"] == []


def test_shutdown_is_clean_even_with_a_slow_request_in_flight(s3):
    s3.reset()
    with FaultProxy(s3.endpoint) as p:
        client = s3.client(p.endpoint, retries=NO_RETRY, read_timeout=5)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="k", Body=b"data")
        p.fail("k", "slow:30")
        caller = threading.Thread(target=lambda: _swallow(client.get_object, Bucket=BUCKET, Key="k"))
        caller.start()
        deadline = time.monotonic() + 2
        while _gets(p, "k") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        endpoint = p.endpoint
        start = time.monotonic()
    assert time.monotonic() - start < 3
    caller.join(timeout=5)
    assert not caller.is_alive()
    with pytest.raises(EndpointConnectionError):
        s3.client(endpoint, retries=NO_RETRY).list_buckets()

    with S3Server() as other:
        endpoint = other.endpoint
        assert _raw(endpoint, "GET", "/")[0] == 200
    with pytest.raises(OSError):
        _raw(endpoint, "GET", "/")


def _swallow(fn, **kwargs):
    # The proxy closes under this call on purpose; whatever botocore raises then is expected.
    with contextlib.suppress(BotoCoreError, ClientError):
        fn(**kwargs)
