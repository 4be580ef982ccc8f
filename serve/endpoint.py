"""A served application's watching routes, read as a client reads them: GET /v1/monitor (per version and arm:
traffic, errors, latency, live quality) and GET /v1/monitor/samples (what the rollout judge tests). Used by
stage=rollout (serve/rollout.py) and stage=monitor (serve/monitor_report.py)."""

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

ATTEMPTS = 5  # an endpoint that does not answer this many times in a row is an error naming it


class EndpointError(ValueError):
    """The endpoint refused or did not answer; the message names the URL and what to check."""


@dataclass
class Endpoint:
    url: str  # e.g. http://127.0.0.1:8000 (the application's route prefix included)
    api_key: str | None = None  # sent as a bearer token, as the API requires when serve.api_key is set

    def get(self, path: str) -> dict:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(1, ATTEMPTS + 1):
            try:
                request = urllib.request.Request(self.url + path, headers=headers)
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                raise EndpointError(f"{self.url}{path} answered {err.code}: {err.read().decode(errors='replace')} "
                                    "(is the URL the model's endpoint, and serve.api_key its key?)") from None
            except OSError as err:
                if attempt == ATTEMPTS:
                    raise EndpointError(f"{self.url} does not answer ({err}); is the model served there "
                                        "(stage=serve)?") from None
                time.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    def summary(self, *, window_s: float | None = None) -> dict:
        return self.get("/v1/monitor" + (f"?window_s={window_s!r}" if window_s else ""))

    def now(self) -> float:
        """The server's clock: sample windows are in its time, whatever this machine's clock says."""
        return float(self.summary(window_s=1)["now"])

    def samples(self, *, since: float) -> dict:
        return self.get(f"/v1/monitor/samples?since={since!r}")


def endpoint_of(serve_cfg) -> Endpoint:
    """serve.monitor.url, or the endpoint the serve stage starts from the same config."""
    url = serve_cfg.monitor.url or f"http://{serve_cfg.host}:{serve_cfg.port}{serve_cfg.route_prefix.rstrip('/')}"
    return Endpoint(url.rstrip("/"), api_key=serve_cfg.api_key)
