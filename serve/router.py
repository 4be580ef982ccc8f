"""The ingress: HTTP in, a version chosen per request, the model run, metrics recorded.

One hop: the production deployment is the ingress. Each of its replicas parses and authenticates a request,
picks the version (production or canary), and runs production's share on the model it holds itself (the
family's replica object, serve/replicas.py, living in the same process): Serve's proxy hands the request
straight to the replica that computes it. Only the canary's share takes a second hop, to the canary's own
deployment. (A separate router deployment in front cost every request an extra proxy-to-router-to-replica
trip; scripts/bench_serve.py measures what is left against a bare Serve deployment.)

Every replica follows the registry rather than its own config: a task re-reads the model's aliases every
`serve.refresh_s`, so `stage=rollback`, `stage=promote` or `stage=canary` from any machine that sees the
registry changes what is served within seconds, with no redeploy. Before a new production version takes
traffic the replica loads and checks it, so the swap never sends a request to a version that cannot load,
and requests already running finish on the version they started with.

The canary has a deployment of its own (serve/deploy.py). A second task warms it every `serve.refresh_s`
(load, then a forward pass that must give finite outputs); only a canary that passed its last check gets
traffic, and a canary call that fails is answered by production instead. A broken canary therefore costs
its share of requests nothing but latency, and never the production replicas.

Refusals, whatever their cause, are OpenAI-shaped JSON: an unknown route gets 404 and a wrong method 405, a body
over serve.max_body_bytes 413 before it is read, a full queue (serve.max_queued_requests) 503 with Retry-After,
and an unexpected failure 500. A replica admits at most `ongoing_limit` model requests at once (what its
engine can run plus queue; serve/replicas.py) and refuses more itself, so the refusal has that shape too.
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from serve import api, chat
from serve.registry import Registry
from serve.replicas import replica_class

logger = logging.getLogger(__name__)

app = FastAPI(title="Slipway", docs_url=None, redoc_url=None)

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
CANARY_CHECK_TIMEOUT_S = 60.0  # the first check also scales the canary up from zero replicas and loads it


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote a client's string, and a lone surrogate in it
    cannot be encoded as UTF-8 (Starlette's JSONResponse would fail with a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


@app.exception_handler(HTTPException)
async def _unknown_route(request: Request, err: HTTPException) -> JSONResponse:
    """An unknown path (404) or method (405) answered in OpenAI's error shape, like every other refusal, so an
    OpenAI client shows it as it shows OpenAI's own."""
    if err.status_code == 404:
        message, kind = f"{request.method} {request.url.path} is not a route of this server", "not_found_error"
    elif err.status_code == 405:
        allowed = {key.lower(): value for key, value in (err.headers or {}).items()}.get("allow", "?")
        message = f"{request.url.path} does not take {request.method} (allowed: {allowed})"
        kind = "invalid_request_error"
    else:
        message, kind = str(err.detail), "invalid_request_error"
    error = api.RequestError(err.status_code, message, None, type=kind)
    return AsciiJSONResponse(error.body(), status_code=err.status_code, headers=dict(err.headers or {}))


@dataclass(frozen=True)
class LLMRoute:
    """How one text-generation route reads its body and shapes its answers (serve/api.py, serve/chat.py)."""

    path: str
    parse: object  # (payload, *, served, max_tokens_limit) -> the replica's request
    new_id: object  # () -> the answer's id
    body: object  # (result, *, request_id, served, version) -> the answer
    stream: type  # (request_id=, served=, version=, include_usage=) -> .events(chunk), .end()


COMPLETIONS = LLMRoute("/v1/completions", api.parse_completion, api.completion_id, api.completion_body,
                       api.CompletionStream)
CHAT = LLMRoute("/v1/chat/completions", chat.parse_chat, chat.chat_id, chat.chat_body, chat.ChatStream)


def _unix_time(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return 0


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


async def _close(chunks) -> None:
    """Stop a generation whose stream is abandoned: a canary call's stream is cancelled, a local one closed."""
    if hasattr(chunks, "cancel"):
        chunks.cancel()
    else:
        await chunks.aclose()


def _overloaded(err: BackPressureError) -> api.RequestError:
    return api.overloaded(f"{err.message.rstrip('. ')} (serve.max_queued_requests)",
                          retry_after_s=max(1, math.ceil(err.retry_after_s or 1)))


def _at_capacity(in_flight: int) -> api.RequestError:
    return api.overloaded(f"{in_flight} requests are already in flight on this replica, as many as it runs and "
                          f"queues (serve.max_queued_requests)", retry_after_s=api.RETRY_AFTER_S)


class Ingress:
    """What every ingress replica does around the model, whichever engine runs it: follow the registry's aliases,
    check the canary, authenticate, bound the body and the requests in flight, pick each request's version, and
    answer in OpenAI's shape with metrics. Subclasses say how a version change is prepared (`_accept_routes`),
    how the canary is checked (`_probe_canary`) and how a request reaches the model; they start the tasks with
    `_start_tasks` once they can take traffic."""

    def __init__(self, *, settings: dict):
        self.settings = settings
        self.model = settings["model"]
        self.registry = Registry(settings["registry"])
        self.routes = routes_from_aliases(self.registry.aliases(self.model), model=self.model)
        self.healthy_canary: int | None = None  # the canary version that passed its last check
        self.created: dict[int, int] = {}  # registration times of versions, for /v1/models
        self.metrics = _Metrics()
        self.random = random.Random()
        self.in_flight = 0  # model requests admitted and not yet answered
        self._tasks: list[asyncio.Task] = []

    def _start_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._follow_registry()), loop.create_task(self._watch_canary())]

    def __del__(self):
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------------------ following the registry

    async def _accept_routes(self, routes: Routes) -> Routes:
        """The routes this replica will serve when the registry's aliases say `routes`; raise to keep the
        current ones."""
        return routes

    async def _probe_canary(self, version: int) -> None:
        """Raise unless the canary `version` answers."""
        raise NotImplementedError

    async def _follow_registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings["refresh_s"])
            try:
                aliases = await asyncio.to_thread(self.registry.aliases, self.model)
                routes = await self._accept_routes(routes_from_aliases(aliases, model=self.model))
                if routes != self.routes:
                    logger.info("%s routes: %s -> %s", self.model, self.routes, routes)
                    self.routes = routes
            except Exception:  # an unreadable registry or a version that fails to load keeps the current routes
                logger.exception("could not switch to the registry's aliases; still serving %s", self.routes)

    async def _watch_canary(self) -> None:
        """Check the canary every refresh; traffic goes only to a canary that passed."""
        while True:
            await asyncio.sleep(self.settings["refresh_s"])
            canary, healthy = self.routes.canary, None
            if canary is not None:
                try:
                    await asyncio.wait_for(self._probe_canary(canary), timeout=CANARY_CHECK_TIMEOUT_S)
                    healthy = canary
                except Exception as err:
                    if self.healthy_canary is not None:
                        logger.warning("canary v%d failed its check; production takes its traffic: %s", canary, err)
            if healthy is not None and healthy != self.healthy_canary:
                logger.info("canary v%d passed its check; it takes %g%% of the traffic", healthy,
                            self.routes.canary_percent)
            self.healthy_canary = healthy

    # ---------------------------------------------------------------------------------- plumbing

    def _check_auth(self, request: Request) -> None:
        key = self.settings.get("api_key")
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise api.RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <serve.api_key>'",
                                   "authorization", type="authentication_error")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 by its Content-Length before a byte is read, or (sent chunked, without a
        length) as soon as it grows past the limit: a 50 MB body is never copied to the router or parsed on
        its event loop, which every other request shares."""
        limit = self.settings["max_body_bytes"]
        api.check_content_length(request.headers.get("content-length"), limit=limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise api.body_too_large(limit)
        return bytes(body)

    async def _answer(self, request: Request, route: str, handler) -> JSONResponse | StreamingResponse:
        """Run `handler(payload, version, canary)`, turning every failure into an OpenAI-shaped answer and
        recording metrics. The request counts as in flight until it is answered, or (streamed) until the model
        accepted it: the engine's own bounded queue holds running streams (serve/engine.py)."""
        started, version, status, admitted = time.perf_counter(), None, 500, False
        try:
            self._check_auth(request)
            payload = api.parse_json_object(await self._read_body(request))
            self._admit()
            admitted = True
            version, canary = self._pick()
            response = await handler(payload, version, canary)
            status = response.status_code
            return response
        except api.RequestError as err:
            status = err.status
            return AsciiJSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except BackPressureError as err:
            status = 503
            error = _overloaded(err)
            return AsciiJSONResponse(error.body(), status_code=503, headers=error.headers)
        except Exception:
            logger.exception("%s failed", route)
            error = api.RequestError(500, "the server failed to answer this request; see the serve logs",
                                     type="server_error")
            return AsciiJSONResponse(error.body(), status_code=500)
        finally:
            if admitted:
                self.in_flight -= 1
            self.metrics.record(model=self.model, version=version, route=route, status=status, started=started)

    def _admit(self) -> None:
        if self.in_flight >= self.settings["ongoing_limit"]:
            raise _at_capacity(self.in_flight)
        self.in_flight += 1

    def _pick(self) -> tuple[int, bool]:
        """This request's version, and whether it is the canary (a canary that failed its check gets none)."""
        routes = self.routes
        version = routes.pick(self.random.random())
        if version != routes.production and version == self.healthy_canary:
            return version, True
        return routes.production, False

    async def _with_production_fallback(self, attempt, version: int, canary: bool):
        """`attempt(version, canary)`; when a canary attempt fails, the canary is benched until it passes its next
        check and production is attempted instead. Backpressure and cancellation pass through as they are."""
        try:
            return await attempt(version, canary)
        except (BackPressureError, asyncio.CancelledError):
            raise
        except Exception:
            if not canary:
                raise
            self._bench_canary(version)
        return await attempt(self.routes.production, False)

    def _bench_canary(self, version: int) -> None:
        logger.exception("canary v%d failed a request; production answers it, and the canary's traffic until it "
                         "passes its next check", version)
        self.healthy_canary = None

    def _require(self, route: str) -> None:
        if route not in self.settings["routes"]:
            raise api.RequestError(404, f"{route} is not served here: {self.model} is a {self.settings['family']} "
                                        f"model", None, type="not_found_error")

    async def _models(self, request: Request):
        """GET /v1/models: the model, its production version and the canary's state."""
        try:
            self._check_auth(request)
        except api.RequestError as err:
            return AsciiJSONResponse(err.body(), status_code=err.status)
        routes = self.routes
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": await self._created(routes.production),
            "owned_by": "slipway", "family": self.settings["family"],
            "production_version": routes.production, "canary_version": routes.canary,
            "canary_percent": routes.canary_percent,
            "canary_healthy": routes.canary is not None and routes.canary == self.healthy_canary}]}

    async def _created(self, version: int) -> int:
        """When the production version was registered (Unix seconds), read once per version."""
        if version not in self.created:
            record = await asyncio.to_thread(self.registry.version, self.model, version)
            self.created[version] = _unix_time(record.get("created_at"))
        return self.created[version]

    def _health(self) -> dict:
        """GET /healthz: open without the API key, for load balancers' and Kubernetes' probes; it shows no more
        than this."""
        return {"status": "ok", "model": self.model, "production_version": self.routes.production}


# Whatever the router's methods use must be defined above this line: serve.ingress copies the class with the
# module's globals as they are when the decorator runs.
@serve.ingress(app)
class Router(Ingress):
    """The production deployment's replica: HTTP, auth and the version choice around the family's model replica
    (`self.local`), which answers production's share in this process."""

    def __init__(self, canary_replicas, *, settings: dict):
        self.canary_replicas = canary_replicas
        self.local = replica_class(settings["family"])({**settings, "role": "production"})
        super().__init__(settings=settings)

    async def reconfigure(self, config: dict) -> None:
        """Serve awaits this before the replica takes traffic: production's version is loaded, and the tasks that
        follow the registry and check the canary start on the replica's event loop."""
        await self.local.reconfigure(config)
        self._start_tasks()

    def check_health(self) -> None:
        self.local.check_health()

    async def _accept_routes(self, routes: Routes) -> Routes:
        """A new production version is loaded and checked here before it takes traffic."""
        if routes.production != self.routes.production:
            await self.local.warm(version=routes.production)
        return routes

    async def _probe_canary(self, version: int) -> None:
        """Load the canary on its deployment (scaled up from zero by the first call) and run a forward pass."""
        await self._canary_handle(version).warm.remote()

    def _canary_handle(self, version: int):
        return self.canary_replicas.options(multiplexed_model_id=str(version))

    async def _call(self, method: str, version: int, canary: bool, *args):
        """One model call: production's in this process, the canary's on its deployment (answered by production
        if the canary fails it)."""
        async def attempt(target: int, on_canary: bool):
            if on_canary:
                return await getattr(self._canary_handle(target), method).remote(*args)
            return await getattr(self.local, method)(*args, version=target)

        return await self._with_production_fallback(attempt, version, canary)

    # ------------------------------------------------------------------------------------ routes

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        return await self._models(request)

    @app.get("/healthz")
    async def health(self) -> dict:
        return self._health()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, COMPLETIONS.path, functools.partial(self._generate, COMPLETIONS))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, CHAT.path, functools.partial(self._generate, CHAT))

    @app.post("/v1/rank")
    async def rank(self, request: Request):
        return await self._answer(request, "/v1/rank", self._rank)

    async def _generate(self, route: LLMRoute, payload: dict, version: int, canary: bool):
        self._require(route.path)
        params = route.parse(payload, served=self.model, max_tokens_limit=self.settings["max_tokens_limit"])
        request_id = route.new_id()
        if params["stream"]:
            return await self._stream(route, params, version, canary, request_id=request_id)
        result = await self._call("complete", version, canary, params)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        body = route.body(result, request_id=request_id, served=self.model, version=result["version"])
        return AsciiJSONResponse(body, headers={"x-model-version": str(result["version"])})

    async def _open_stream(self, params: dict, version: int, canary: bool):
        """The replica's stream and its first answer (accepted, or a 4xx); a canary that fails before it
        accepts hands the request to production."""
        async def attempt(target: int, on_canary: bool):
            if on_canary:
                chunks = self._canary_handle(target).options(stream=True).complete_stream.remote(params)
            else:
                chunks = self.local.complete_stream(params, version=target)
            return chunks, await chunks.__anext__()

        return await self._with_production_fallback(attempt, version, canary)

    async def _stream(self, route: LLMRoute, params: dict, version: int, canary: bool, *,
                      request_id: str) -> StreamingResponse:
        chunks, first = await self._open_stream(params, version, canary)
        if "error" in first:
            raise api.error_from_dict(first["error"])
        served_version = first["version"]
        events = route.stream(request_id=request_id, served=self.model, version=served_version,
                              include_usage=params["include_usage"])
        return StreamingResponse(self._events(chunks, events, version=served_version),
                                 media_type="text/event-stream",
                                 headers={"x-model-version": str(served_version), "cache-control": "no-cache"})

    async def _events(self, chunks, events, *, version: int):
        """The SSE body. The 200 is sent by now, so a failure can only be told as a last event, OpenAI-style;
        a client that goes away cancels this generator, and with it the generation (in this process or on the
        canary's replica)."""
        finished = False
        try:
            async for chunk in chunks:
                for event in events.events(chunk):
                    yield event
            finished = True
        except Exception:
            logger.exception("a streamed completion of v%d failed after it started", version)
            error = api.RequestError(500, "generation failed after the stream started; the text so far is "
                                          "incomplete", type="server_error")
            yield api.stream_error_event(error)
            return
        finally:
            if not finished:
                await _close(chunks)
        for event in events.end():
            yield event

    async def _rank(self, payload: dict, version: int, canary: bool):
        self._require("/v1/rank")
        context, candidates = api.parse_rank(payload, served=self.model,
                                             max_candidates=self.settings["max_candidates"])
        result = await self._call("rank", version, canary, context, candidates)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        order = sorted(range(len(result["scores"])), key=lambda i: -result["scores"][i])
        body = {"model": self.model, "model_version": result["version"], "scores": result["scores"],
                "ranking": order}
        return AsciiJSONResponse(body, headers={"x-model-version": str(result["version"])})

