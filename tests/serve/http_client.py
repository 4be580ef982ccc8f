"""A small HTTP client for the serving tests: answers as (status, json, headers), errors included, and the clients
that misbehave (an oversized body, a client that goes away mid-answer)."""

import http.client
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def request(url: str, body: bytes | dict | None = None, *, headers: dict | None = None,
            timeout: float = 60.0) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=all_headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


def stream(url: str, body: dict, *, timeout: float = 60.0) -> list[str]:
    """The `data:` payloads of a server-sent-event answer, in order."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.read().decode().splitlines()
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


class Load:
    """Threads posting `body` to `url` in a closed loop until stopped; keeps every (status, version)."""

    def __init__(self, url: str, body: dict, *, threads: int, headers: dict | None = None):
        self.url, self.body, self.headers = url, body, headers
        self.answers: list[tuple[int, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            status, answer, _ = request(self.url, self.body, headers=self.headers)
            self.answers.append((status, answer.get("model_version")))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _address(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port, parts.path or "/"


def post_oversized(url: str, size: int, *, timeout: float = 60.0) -> tuple[int, dict, dict, float]:
    """POST a valid JSON body of `size` bytes, sent by another thread while this one waits for the answer, as a
    client that does not wait for the server to read it all; returns (status, json, headers, seconds to the
    answer). A server that answers early and closes the connection only ends the sending thread."""
    host, port, path = _address(url)
    head, tail = b'{"prompt": "', b'"}'
    sock = socket.create_connection((host, port), timeout=timeout)
    started = time.perf_counter()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode())

    def send_body():
        try:
            sock.sendall(head)
            left = size - len(head) - len(tail)
            while left > 0:
                sock.sendall(b"x" * min(left, 1 << 20))
                left -= 1 << 20
            sock.sendall(tail)
        except OSError:  # the server answered and closed: the rest is not wanted
            pass

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        elapsed = time.perf_counter() - started
        return response.status, json.loads(response.read() or b"{}"), dict(response.headers), elapsed
    finally:
        sock.close()
        sender.join(timeout=timeout)


def stream_then_disconnect(url: str, body: dict, *, events: int = 1) -> list[str]:
    """Read the first `events` data payloads of a streamed answer, then drop the connection."""
    host, port, path = _address(url)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    payloads = []
    while len(payloads) < events:
        line = response.fp.readline().decode()
        if line.startswith("data: "):
            payloads.append(line[len("data: "):].strip())
    _drop(connection.sock)
    return payloads


def post_then_disconnect(url: str, body: dict, *, after_s: float) -> None:
    """Send a request and drop the connection `after_s` later, without reading the answer."""
    host, port, path = _address(url)
    sock = socket.create_connection((host, port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    time.sleep(after_s)
    _drop(sock)


def _drop(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, as a killed client
    sock.close()


class Poll:
    """A thread that GETs `url` back to back until stopped; keeps each answer's (status, seconds)."""

    def __init__(self, url: str, *, every_s: float = 0.02):
        self.url, self.every_s = url, every_s
        self.answers: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    status = response.status
            except (urllib.error.URLError, OSError):
                status = 0
            self.answers.append((status, time.perf_counter() - started))

    def __enter__(self) -> "Poll":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
