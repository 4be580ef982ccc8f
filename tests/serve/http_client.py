"""A small HTTP client for the serving tests: answers as (status, json, headers), errors included."""

import json
import threading
import urllib.error
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
