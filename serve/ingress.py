"""What every ingress replica does around the model, whichever engine runs it (the native one, serve/router.py;
vLLM, serve/vllm_app.py): follow the registry's aliases, check the canary and the shadow, authenticate, bound the
body and the requests in flight, pick each request's version, answer in OpenAI's shape with metrics, and report
every answer to the application's watcher (serve/watcher.py), which joins clients' feedback to it.

Every replica follows the registry rather than its own config: a task re-reads the model's aliases every
`serve.refresh_s`, so `stage=rollback`, `stage=promote`, `stage=canary` or a rollout (serve/rollout.py) from any
machine that sees the registry changes what is served within seconds, with no redeploy.

A second task warms the canary and the shadow every `serve.refresh_s` (load, then a forward pass that must give
finite outputs); only one that passed its last check gets traffic, and a canary call that fails is answered by
production instead. A broken canary therefore costs its share of requests nothing but latency, and never the
production replicas.

Refusals, whatever their cause, are OpenAI-shaped JSON: an unknown route gets 404 and a wrong method 405, a body
over serve.max_body_bytes 413 before it is read, a full queue (serve.max_queued_requests) 503 with Retry-After,
and an unexpected failure 500. A replica admits at most `ongoing_limit` model requests at once (what its
engine can run plus queue; serve/replicas.py) and refuses more itself, so the refusal has that shape too.
"""

import asyncio
import hmac
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from serve import api, chat
from serve.feedback import FeedbackError, parse_feedback
from serve.registry import Registry

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
CANARY_CHECK_TIMEOUT_S = 60.0  # the first check also scales the canary up from zero replicas and loads it
# How often a replica sends its answers to the watcher (serve/watcher.py): one call per this many seconds instead
# of one per request, which would add a hop's work to every request; feedback sent sooner waits for it there.
REPORT_INTERVAL_S = 0.5


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote a client's string, and a lone surrogate in it
    cannot be encoded as UTF-8 (Starlette's JSONResponse would fail with a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


async def unknown_route(request: Request, err: HTTPException) -> JSONResponse:
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
    shadow: int | None = None  # also sent shadow_percent of the requests; its answers reach only the watcher
    shadow_percent: float = 0.0

    def pick(self, draw: float) -> int:
        """The version for one request, given a uniform draw in [0, 1)."""
        if self.canary is not None and draw * 100 < self.canary_percent:
            return self.canary
        return self.production


def routes_from_aliases(aliases: dict, *, model: str) -> Routes:
    if "production" not in aliases:
        raise ValueError(f"{model} has no production version: promote one first (stage=promote)")
    canary, shadow = aliases.get("canary"), aliases.get("shadow")
    return Routes(production=aliases["production"]["version"], canary=canary["version"] if canary else None,
                  canary_percent=float(canary.get("percent", 0.0)) if canary else 0.0,
                  shadow=shadow["version"] if shadow else None,
                  shadow_percent=float(shadow.get("percent", 0.0)) if shadow else 0.0)


class _Metrics:
    def __init__(self):
        tags = ("model", "version", "route")
        self.requests = metrics.Counter("slipway_requests", description="Requests answered, by model version",
                                        tag_keys=tags)
        self.errors = metrics.Counter("slipway_request_errors", description="Requests answered with an error",
                                      tag_keys=(*tags, "status"))
        self.latency = metrics.Histogram("slipway_request_latency_ms", description="Time to the full answer",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)
        self.shadow_skipped = metrics.Counter("slipway_shadow_skipped", description="Requests not mirrored to the "
                                              "shadow because SHADOW_IN_FLIGHT mirrored ones were unanswered",
                                              tag_keys=("model", "version"))

    def record(self, *, model: str, version: int | None, route: str, status: int, started: float) -> None:
        tags = {"model": model, "version": str(version or "none"), "route": route}
        self.requests.inc(tags=tags)
        self.latency.observe((time.perf_counter() - started) * 1000, tags=tags)
        if status >= 400:
            self.errors.inc(tags={**tags, "status": str(status)})


def _query_number(request: Request, name: str, *, default: float | None) -> float | None:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise api.RequestError(400, f"{name}: expected a non-negative number, got {value!r}", name)
    return number


def _parse_fault(payload: dict) -> tuple[int, dict]:
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise api.RequestError(400, "version: expected a registered version number", "version")
    fault = {}
    for key, upper in (("latency_ms", 60_000.0), ("error_rate", 1.0)):
        value = payload.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= upper:
            raise api.RequestError(400, f"{key}: expected a number from 0 to {upper:g}, got {value!r}", key)
        if value:
            fault[key] = float(value)
    return version, fault


async def close_chunks(chunks) -> None:
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
    check the canary and the shadow, authenticate, bound the body and the requests in flight, pick each request's
    version, answer in OpenAI's shape with metrics, and report every answer to the watcher. Subclasses say how a
    version change is prepared (`_accept_routes`), how the canary and the shadow are checked (`_probe_canary`,
    `_probe_shadow`) and how a request reaches the model; they start the tasks with `_start_tasks` once they can
    take traffic."""

    def __init__(self, *, settings: dict, watcher=None):
        self.settings = settings
        self.watcher = watcher  # the application's ledger of answers and feedback (None: not watched)
        self.faults: dict[str, dict] = {}  # the watcher's test-only faults, by version
        self._outbox: list[dict] = []  # answers not yet reported to the watcher
        self.model = settings["model"]
        self.registry = Registry(settings["registry"])
        self.routes = routes_from_aliases(self.registry.aliases(self.model), model=self.model)
        self.healthy_canary: int | None = None  # the canary version that passed its last check
        self.healthy_shadow: int | None = None  # likewise the shadow
        self.created: dict[int, int] = {}  # registration times of versions, for /v1/models
        self.metrics = _Metrics()
        self.random = random.Random()
        self.in_flight = 0  # model requests admitted and not yet answered
        self._tasks: list[asyncio.Task] = []

    def _start_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._follow_registry()), loop.create_task(self._watch_arms())]
            if self.watcher is not None:
                self._tasks.append(loop.create_task(self._report_answers()))

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

    async def _probe_shadow(self, version: int) -> None:
        """Raise unless the shadow `version` answers (an engine without a shadow deployment never mirrors)."""
        raise RuntimeError("this engine has no shadow deployment (serve.engine=native has)")

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

    async def _watch_arms(self) -> None:
        """Check the canary and the shadow every refresh; traffic goes only to one that passed."""
        while True:
            await asyncio.sleep(self.settings["refresh_s"])
            self.healthy_canary = await self._check_arm("canary", self.routes.canary, self.routes.canary_percent,
                                                        self.healthy_canary, self._probe_canary)
            self.healthy_shadow = await self._check_arm("shadow", self.routes.shadow, self.routes.shadow_percent,
                                                        self.healthy_shadow, self._probe_shadow)

    @staticmethod
    async def _check_arm(arm: str, version: int | None, percent: float, healthy: int | None, probe) -> int | None:
        """The arm's version if it passed this check, else None."""
        if version is None:
            return None
        try:
            await asyncio.wait_for(probe(version), timeout=CANARY_CHECK_TIMEOUT_S)
        except Exception as err:
            if healthy is not None:
                logger.warning("%s v%d failed its check; it gets no traffic until it passes: %s", arm, version, err)
            return None
        if version != healthy:
            logger.info("%s v%d passed its check; it takes %g%% of the traffic", arm, version, percent)
        return version

    async def _report_answers(self) -> None:
        """The answers since the last report, to the watcher in one call; it answers with the faults to inject."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            batch, self._outbox = self._outbox, []
            try:
                self.faults = await self.watcher.served.remote(batch)
            except Exception:  # watching must never take serving down
                logger.exception("reporting %d answers to the watcher failed; they go unwatched", len(batch))

    def _note(self, served: dict, *, version: int, canary: bool, status: int, started: float) -> None:
        """One answered request for the watcher: its id, the version and arm that answered it (production when a
        failing canary handed it over), latency, status and a ranker's scores."""
        if self.watcher is None:
            return
        answered = served.get("version", version)
        self._outbox.append({"request_id": served.get("request_id"), "version": answered,
                             "arm": "canary" if canary and answered == version else "production",
                             "latency_ms": (time.perf_counter() - started) * 1000, "status": status,
                             "scores": served.get("scores"), "at": time.time()})

    async def _inject_fault(self, version: int) -> None:
        """The test-only hook (serve.monitor.fault_injection): the version's requests wait and fail as set."""
        fault = self.faults.get(str(version))
        if not fault:
            return
        if fault.get("latency_ms"):
            await asyncio.sleep(fault["latency_ms"] / 1000)
        if self.random.random() < fault.get("error_rate", 0.0):
            raise api.RequestError(500, f"injected fault of v{version} (serve.monitor.fault_injection)",
                                   type="server_error")

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
        """Run `handler(payload, version, canary, served)`, turning every failure into an OpenAI-shaped answer and
        recording metrics; the handler fills `served` with what the watcher needs (request_id, the version that
        answered, a ranker's scores). The request counts as in flight until it is answered, or (streamed) until
        the model accepted it: the engine's own bounded queue holds running streams (serve/engine.py)."""
        started, version, canary, status, admitted, served = time.perf_counter(), None, False, 500, False, {}
        try:
            self._check_auth(request)
            payload = api.parse_json_object(await self._read_body(request))
            self._admit()
            admitted = True
            version, canary = self._pick()
            await self._inject_fault(version)
            response = await handler(payload, version, canary, served)
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
            if version is not None:
                self._note(served, version=version, canary=canary, status=status, started=started)

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

    # ------------------------------------------------------------------------- feedback and watching

    async def _watched(self, request: Request, call) -> JSONResponse:
        """`call()`'s answer to a feedback or monitoring request, behind the API key, with errors in OpenAI's
        shape; 404 where the application has no watcher."""
        try:
            self._check_auth(request)
            if self.watcher is None:
                raise api.RequestError(404, f"{request.url.path} is not served here: this application has no "
                                            "watcher (serve.engine=vllm)", None, type="not_found_error")
            return await call()
        except FeedbackError as err:
            return AsciiJSONResponse(api.RequestError(err.status, str(err), err.field).body(), status_code=err.status)
        except api.RequestError as err:
            return AsciiJSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _feedback(self, request: Request) -> JSONResponse:
        """POST /v1/feedback: a delayed label for an answer (serve/feedback.py). 200 when joined to its
        prediction, 202 when the prediction has not reached the watcher yet (it is joined when it does)."""
        async def call():
            request_id, label = parse_feedback(api.parse_json_object(await self._read_body(request)))
            result = await self.watcher.feedback.remote(request_id, label)
            if "error" in result:
                raise api.error_from_dict(result["error"])
            return AsciiJSONResponse({"request_id": request_id, "status": result["status"]},
                                     status_code=200 if result["status"] == "joined" else 202)

        return await self._watched(request, call)

    async def _monitor(self, request: Request) -> JSONResponse:
        """GET /v1/monitor[?window_s=S]: per version and arm, traffic, errors, latency and live quality."""
        async def call():
            window_s = _query_number(request, "window_s", default=None)
            return AsciiJSONResponse(await self.watcher.summary.remote(window_s))

        return await self._watched(request, call)

    async def _samples(self, request: Request) -> JSONResponse:
        """GET /v1/monitor/samples?since=T[&until=T]: the raw per-arm samples the rollout judge tests."""
        async def call():
            since = _query_number(request, "since", default=None)
            if since is None:
                raise api.RequestError(400, "since: expected the start of the window, in Unix seconds", "since")
            until = _query_number(request, "until", default=None)
            return AsciiJSONResponse(await self.watcher.samples.remote(since, until))

        return await self._watched(request, call)

    async def _fault(self, request: Request) -> JSONResponse:
        """POST /v1/faults {"version", "latency_ms", "error_rate"}: the test-only hook; 404 unless
        serve.monitor.fault_injection is on. A fault with neither field clears the version's."""
        async def call():
            if not self.settings["monitor"]["fault_injection"]:
                raise api.RequestError(404, "fault injection is off (serve.monitor.fault_injection=false)", None,
                                       type="not_found_error")
            version, fault = _parse_fault(api.parse_json_object(await self._read_body(request)))
            return AsciiJSONResponse({"faults": await self.watcher.set_fault.remote(version, fault)})

        return await self._watched(request, call)

    def _health(self) -> dict:
        """GET /healthz: open without the API key, for load balancers' and Kubernetes' probes; it shows no more
        than this."""
        return {"status": "ok", "model": self.model, "production_version": self.routes.production}
