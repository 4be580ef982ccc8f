"""The ingress: HTTP in, a version chosen per request, the model replicas called, metrics recorded.

The router follows the registry rather than its own config: a thread re-reads the model's aliases every
`serve.refresh_s`, so `stage=rollback`, `stage=promote` or `stage=canary` from any machine that sees the
registry changes what is served within seconds, with no redeploy. Before a new version takes traffic the
router warms it on a replica, so the swap never sends a request to a version that cannot load.
"""

import hmac
import logging
import random
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics

from serve import api
from serve.registry import Registry

logger = logging.getLogger(__name__)

app = FastAPI(title="Slipway", docs_url=None, redoc_url=None)

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


@dataclass(frozen=True)
class Routes:
    production: int
    canary: int | None = None
    canary_percent: float = 0.0

    def pick(self, draw: float) -> int:
        """The version for one request, given a uniform draw in [0, 1)."""
        if self.canary is not None and draw * 100 < self.canary_percent:
            return self.canary
        return self.production


def routes_from_aliases(aliases: dict, *, model: str) -> Routes:
    if "production" not in aliases:
        raise ValueError(f"{model} has no production version: promote one first (stage=promote)")
    canary = aliases.get("canary")
    return Routes(production=aliases["production"]["version"], canary=canary["version"] if canary else None,
                  canary_percent=float(canary.get("percent", 0.0)) if canary else 0.0)


class _Metrics:
    def __init__(self):
        tags = ("model", "version", "route")
        self.requests = metrics.Counter("slipway_requests", description="Requests answered, by model version",
                                        tag_keys=tags)
        self.errors = metrics.Counter("slipway_request_errors", description="Requests answered with an error",
                                      tag_keys=(*tags, "status"))
        self.latency = metrics.Histogram("slipway_request_latency_ms", description="Time to the full answer",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)

    def record(self, *, model: str, version: int | None, route: str, status: int, started: float) -> None:
        tags = {"model": model, "version": str(version or "none"), "route": route}
        self.requests.inc(tags=tags)
        self.latency.observe((time.perf_counter() - started) * 1000, tags=tags)
        if status >= 400:
            self.errors.inc(tags={**tags, "status": str(status)})


@serve.ingress(app)
class Router:
    def __init__(self, replicas, *, settings: dict):
        self.replicas = replicas
        self.settings = settings
        self.model = settings["model"]
        self.registry = Registry(settings["registry"])
        self.routes = routes_from_aliases(self.registry.aliases(self.model), model=self.model)
        self.metrics = _Metrics()
        self.random = random.Random()
        self._stop = threading.Event()
        threading.Thread(target=self._follow_registry, name="registry-follower", daemon=True).start()

    # ------------------------------------------------------------------------ following the registry

    def _follow_registry(self) -> None:
        while not self._stop.wait(self.settings["refresh_s"]):
            try:
                routes = routes_from_aliases(self.registry.aliases(self.model), model=self.model)
                if routes != self.routes:
                    self._warm(routes)
                    logger.info("%s routes: %s -> %s", self.model, self.routes, routes)
                    self.routes = routes
            except Exception:  # an unreadable registry or a version that fails to load keeps the current routes
                logger.exception("could not switch to the registry's aliases; still serving %s", self.routes)

    def _warm(self, routes: Routes) -> None:
        for version in {routes.production, routes.canary} - {None}:
            self.replicas.options(multiplexed_model_id=str(version)).warm.remote().result(timeout_s=600)

    def __del__(self):
        self._stop.set()

    # ---------------------------------------------------------------------------------- plumbing

    def _check_auth(self, request: Request) -> None:
        key = self.settings.get("api_key")
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise api.RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <serve.api_key>'",
                                   "authorization", type="authentication_error")

    async def _answer(self, request: Request, route: str, handler) -> JSONResponse | StreamingResponse:
        """Run `handler(payload, version)`, turning request errors into 4xx and recording metrics."""
        started, version, status = time.perf_counter(), None, 500
        try:
            self._check_auth(request)
            payload = api.parse_json_object(await request.body())
            version = self.routes.pick(self.random.random())
            response = await handler(payload, version)
            status = response.status_code
            return response
        except api.RequestError as err:
            status = err.status
            return JSONResponse(err.body(), status_code=err.status)
        finally:
            self.metrics.record(model=self.model, version=version, route=route, status=status, started=started)

    def _handle(self, version: int):
        return self.replicas.options(multiplexed_model_id=str(version))

    def _require(self, route: str) -> None:
        if route not in self.settings["routes"]:
            raise api.RequestError(404, f"{route} is not served here: {self.model} is a {self.settings['family']} "
                                        f"model", None, type="not_found_error")

    # ------------------------------------------------------------------------------------ routes

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        routes = self.routes
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "owned_by": "slipway", "family": self.settings["family"],
            "production_version": routes.production, "canary_version": routes.canary,
            "canary_percent": routes.canary_percent}]}

    @app.get("/healthz")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model, "production_version": self.routes.production}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, "/v1/completions", self._complete)

    @app.post("/v1/rank")
    async def rank(self, request: Request):
        return await self._answer(request, "/v1/rank", self._rank)

    async def _complete(self, payload: dict, version: int):
        self._require("/v1/completions")
        params = api.parse_completion(payload, served=self.model, max_tokens_limit=self.settings["max_tokens_limit"])
        request_id = api.completion_id()
        if params["stream"]:
            return await self._stream(params, version, request_id=request_id)
        result = await self._handle(version).complete.remote(params)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        body = api.completion_body(result, request_id=request_id, served=self.model, version=result["version"])
        return JSONResponse(body, headers={"x-model-version": str(result["version"])})

    async def _stream(self, params: dict, version: int, *, request_id: str) -> StreamingResponse:
        chunks = self._handle(version).options(stream=True).complete_stream.remote(params)
        first = await chunks.__anext__()
        if "error" in first:
            raise api.error_from_dict(first["error"])
        served_version = first["version"]

        async def events():
            async for chunk in chunks:
                yield api.stream_event(chunk, request_id=request_id, served=self.model, version=served_version)
            yield api.STREAM_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-model-version": str(served_version), "cache-control": "no-cache"})

    async def _rank(self, payload: dict, version: int):
        self._require("/v1/rank")
        context, candidates = api.parse_rank(payload, served=self.model,
                                             max_candidates=self.settings["max_candidates"])
        result = await self._handle(version).rank.remote(context, candidates)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        order = sorted(range(len(result["scores"])), key=lambda i: -result["scores"][i])
        body = {"model": self.model, "model_version": result["version"], "scores": result["scores"],
                "ranking": order}
        return JSONResponse(body, headers={"x-model-version": str(result["version"])})

