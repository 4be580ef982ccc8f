"""The native engine's ingress: HTTP in, a version chosen per request, the model run, metrics recorded.

One hop: the production deployment is the ingress. Each of its replicas parses and authenticates a request,
picks the version (production or canary), and runs production's share on the model it holds itself (the
family's replica object, serve/replicas.py, living in the same process): Serve's proxy hands the request
straight to the replica that computes it. Only the canary's share takes a second hop, to the canary's own
deployment. (A separate router deployment in front cost every request an extra proxy-to-router-to-replica
trip; scripts/bench_serve.py measures what is left against a bare Serve deployment.) What both engines' ingresses
share (registry following, admission, errors, the watcher) is serve/ingress.py.

The canary and the shadow have deployments of their own (serve/deploy.py). Before a new production version takes
traffic the replica loads and checks it, so the swap never sends a request to a version that cannot load, and
requests already running finish on the version they started with. A share of requests (serve.shadow_percent) is
also sent to the shadow once production has answered; its answers reach only the watcher.
"""

import asyncio
import functools
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from serve import api
from serve.ingress import (
    CHAT,
    COMPLETIONS,
    AsciiJSONResponse,
    Ingress,
    LLMRoute,
    Routes,
    close_chunks,
    unknown_route,
)
from serve.replicas import replica_class

logger = logging.getLogger(__name__)

app = FastAPI(title="Slipway", docs_url=None, redoc_url=None)
app.exception_handler(HTTPException)(unknown_route)

SHADOW_IN_FLIGHT = 32  # mirrored requests a replica has unanswered at once; more are not mirrored

# Whatever the router's methods use must be defined above this line: serve.ingress copies the class with the
# module's globals as they are when the decorator runs.
@serve.ingress(app)
class Router(Ingress):
    """The production deployment's replica: HTTP, auth and the version choice around the family's model replica
    (`self.local`), which answers production's share in this process."""

    def __init__(self, canary_replicas, watcher=None, shadow_replicas=None, *, settings: dict):
        self.canary_replicas, self.shadow_replicas = canary_replicas, shadow_replicas
        self._mirrored: set[asyncio.Task] = set()  # shadow calls in flight (held: the loop keeps weak references)
        self.local = replica_class(settings["family"])({**settings, "role": "production"})
        super().__init__(settings=settings, watcher=watcher)

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

    async def _probe_shadow(self, version: int) -> None:
        if self.shadow_replicas is None:
            return await super()._probe_shadow(version)
        await self.shadow_replicas.options(multiplexed_model_id=str(version)).warm.remote()

    def _mirror(self, method: str, *args, request_id: str) -> None:
        """Send serve.shadow_percent of the requests to the shadow as well, once production has answered: the
        client's answer does not wait for it (the cost on the request path is starting a task). Beyond
        SHADOW_IN_FLIGHT unanswered shadow calls per replica, a request is not mirrored: a slow shadow must not
        pile up work in the replica that serves production."""
        routes, shadow = self.routes, self.healthy_shadow
        if shadow is None or shadow != routes.shadow or self.random.random() * 100 >= routes.shadow_percent:
            return
        if len(self._mirrored) >= SHADOW_IN_FLIGHT:
            self.metrics.shadow_skipped.inc(tags={"model": self.model, "version": str(shadow)})
            return
        task = asyncio.get_running_loop().create_task(self._shadow_call(method, shadow, args, request_id))
        self._mirrored.add(task)
        task.add_done_callback(self._mirrored.discard)

    async def _shadow_call(self, method: str, version: int, args: tuple, request_id: str) -> None:
        """One mirrored request: its answer goes to the watcher only (arm "shadow", the same request id, so feedback
        labels the shadow's prediction too)."""
        started, status, scores = time.perf_counter(), 500, None
        try:
            handle = self.shadow_replicas.options(multiplexed_model_id=str(version))
            result = await getattr(handle, method).remote(*args)
            status = api.error_from_dict(result["error"]).status if "error" in result else 200
            scores = result.get("scores")
        except BackPressureError:
            status = 503
        except Exception:
            logger.exception("the shadow v%d failed a mirrored request; clients are not affected", version)
        self._outbox.append({"request_id": request_id, "version": version, "arm": "shadow", "status": status,
                             "latency_ms": (time.perf_counter() - started) * 1000, "scores": scores,
                             "at": time.time()})

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

    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        return await self._feedback(request)

    @app.get("/v1/monitor")
    async def monitor(self, request: Request):
        return await self._monitor(request)

    @app.get("/v1/monitor/samples")
    async def monitor_samples(self, request: Request):
        return await self._samples(request)

    @app.post("/v1/faults")
    async def faults(self, request: Request):
        return await self._fault(request)

    async def _generate(self, route: LLMRoute, payload: dict, version: int, canary: bool, served: dict):
        self._require(route.path)
        params = route.parse(payload, served=self.model, max_tokens_limit=self.settings["max_tokens_limit"])
        request_id = served["request_id"] = route.new_id()
        if params["stream"]:
            return await self._stream(route, params, version, canary, served)
        result = await self._call("complete", version, canary, params)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        served["version"] = result["version"]
        self._mirror("complete", params, request_id=request_id)
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

    async def _stream(self, route: LLMRoute, params: dict, version: int, canary: bool,
                      served: dict) -> StreamingResponse:
        chunks, first = await self._open_stream(params, version, canary)
        if "error" in first:
            raise api.error_from_dict(first["error"])
        served_version = served["version"] = first["version"]
        self._mirror("complete", {**params, "stream": False}, request_id=served["request_id"])
        events = route.stream(request_id=served["request_id"], served=self.model, version=served_version,
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
                await close_chunks(chunks)
        for event in events.end():
            yield event

    async def _rank(self, payload: dict, version: int, canary: bool, served: dict):
        self._require("/v1/rank")
        context, candidates = api.parse_rank(payload, served=self.model,
                                             max_candidates=self.settings["max_candidates"])
        result = await self._call("rank", version, canary, context, candidates)
        if "error" in result:
            raise api.error_from_dict(result["error"])
        order = sorted(range(len(result["scores"])), key=lambda i: -result["scores"][i])
        # The id names this answer in POST /v1/feedback (the clicked candidates, by their index here).
        served.update(request_id=f"rank-{uuid.uuid4().hex[:24]}", version=result["version"], scores=result["scores"])
        self._mirror("rank", context, candidates, request_id=served["request_id"])
        body = {"id": served["request_id"], "model": self.model, "model_version": result["version"],
                "scores": result["scores"], "ranking": order}
        return AsciiJSONResponse(body, headers={"x-model-version": str(result["version"])})
