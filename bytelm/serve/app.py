"""The HTTP API and the web page: an OpenAI-compatible completions endpoint, per-byte scores, and a page that
colours every byte by how expected it was. `bytelm serve MODEL` (bytelm/cli/serve.py) runs it with uvicorn.

    from bytelm.serve.app import ServeSettings, create_app
    app = create_app("byte_llm_model.pt", ServeSettings(api_key="secret"))   # a path, a ByteLM, or a loader

Routes (docs/serving.md has a curl example of each):
    GET  /                 the page (bytelm/serve/web/index.html; no key needed, it asks for one)
    GET  /health           {"status": "ok"} once the model is loaded, 503 before (no key needed)
    GET  /metrics          counters in Prometheus' text format (bytelm/serve/metrics.py; behind the key)
    GET  /v1/models        the loaded model: config, parameter count, context
    POST /v1/completions   OpenAI-style completion; stream=true sends server-sent events ending in [DONE]
    POST /v1/score         per-byte surprisal, entropy, rank and top alternatives; bits per byte; patches

Only the user's own pages reach it: bytelm/serve/guard.py checks Host and Origin and adds the page's
Content-Security-Policy; bodies are read only as application/json (api.parse_body). HEAD works where GET does.

Every error is a JSON object {"error": {"message", "type", "param", "code"}} with the status that fits and a
message naming the field or limit (bytelm/serve/api.py parses the bodies). Generation runs in
bytelm.serve.engine.Engine, which serves every client from the one model; scoring in bytelm.serve.scoring, off
the event loop, as `bytelm score` scores.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from bytelm.serve.api import (ApiError, CompletionBody, ScoreBody, check_score_size, error_response,
                              generation_request, logprobs_json, parse_body, score_answer, text_bytes, usage_json)
from bytelm.serve.engine import Engine, EngineBusy, Failed, Finished, Generation, Piece
from bytelm.serve.guard import ApiKeyCheck, HostCheck, SiteGuard, page_policy
from bytelm.serve.metrics import Metrics, RequestCounter
from bytelm.serve.scoring import ClientGone, Scorer, ScoreBusy
from bytelm.settings import option
from bytelm.errors import BytelmError

@dataclass
class ServeSettings:
    """Everything `bytelm serve` can set besides the model; the CLI's flags come from these fields."""
    host: str = option("127.0.0.1", "address to listen on (loopback only by default; 0.0.0.0 = every "
                       "interface, put it behind TLS and an API key)", group="server")
    port: int = option(8000, "TCP port (0 = any free port)", group="server")  # llama-server's is 8080
    api_key: str = option("", "require `Authorization: Bearer KEY` on /v1/ routes and /metrics (default: env "
                          "BYTELM_API_KEY, else none)", group="server", metavar="KEY")
    allow_host: str = option("", "more names the Host header may carry, comma-separated (default: loopback "
                             "names and addresses, and the --host address; * = any)", group="server",
                             metavar="NAMES")
    allow_origin: str = option("", "web origins besides the server's own whose pages may use the API (CORS), "
                               "comma-separated, e.g. http://localhost:3000 (* = any)", group="server",
                               metavar="ORIGINS")
    max_active: int = option(8, "generations stepped at once; more wait in the queue", group="limits",
                            metavar="N")
    max_queue: int = option(32, "requests waiting for a slot, and texts waiting to be scored; past it the "
                            "answer is 503 with Retry-After",
                            group="limits", metavar="N")
    max_prompt_bytes: int = option(65536, "largest prompt or text to score, in UTF-8 bytes (413 past it)",
                                   group="limits", metavar="BYTES")
    max_tokens: int = option(4096, "largest max_tokens a request may ask for (400 past it)", group="limits",
                        metavar="N")
    max_score_alternatives: int = option(1 << 19, "largest text bytes x top_k of one /v1/score answer, "
                                         "64 KiB x 8 by default (413 past it)", group="limits", metavar="N")
    max_body_bytes: int = option(1 << 20, "largest request body in bytes (413 past it)", group="limits",
                                 metavar="BYTES")
    stall_timeout: float = option(30.0, "seconds a stream may go unread before its generation is dropped "
                                  "(it pauses as soon as 4 KiB of its bytes wait unread)", group="limits",
                                  metavar="S")
    workers: int = option(1, "engine threads; each steps its own rows (the C step releases the GIL, so two "
                          "workers can use two free cores)", group="limits", metavar="N")

    def validate(self) -> None:
        for name in ("max_active", "max_prompt_bytes", "max_tokens", "max_body_bytes", "workers",
                     "max_score_alternatives"):
            if getattr(self, name) < 1:
                raise BytelmError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.stall_timeout > 0:
            raise BytelmError(f"stall-timeout must be above 0, got {self.stall_timeout}")
        if self.max_queue < 0:
            raise BytelmError(f"max-queue must be at least 0, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise BytelmError(f"port must be in 0..65535, got {self.port}")


class _State:
    """What the routes share: the settings, the model once loaded, and its engine."""

    def __init__(self, settings: ServeSettings, name: str):
        self.settings, self.name = settings, name
        self.created = int(time.time())
        self.model = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.scorer: Scorer | None = None
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None,
                               lambda: self.scorer.in_flight if self.scorer else 0)

    def ready(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is still loading", headers={"Retry-After": "1"})
        return self.engine


def _load(source) -> torch.nn.Module:
    if callable(source) and not isinstance(source, torch.nn.Module):
        return source()
    if isinstance(source, torch.nn.Module):
        return source.eval()
    from bytelm.checkpoint import load_model
    return load_model(source)[0]


def create_app(model: str | os.PathLike | torch.nn.Module | Callable[[], torch.nn.Module],
               settings: ServeSettings | None = None, name: str | None = None,
               decode_step: str = "auto") -> FastAPI:
    """The app. `model`: a checkpoint path, a ByteLM, or a function returning one; anything but a module is
    loaded in a thread at startup, and /health answers 503 until it is ready. decode_step: as
    ByteLevelGenerator's ("exact" for the fp32 C step)."""
    settings = settings or ServeSettings()
    settings.validate()
    if name is None:
        name = Path(model).stem if isinstance(model, (str, os.PathLike)) else "bytelm"
    state = _State(settings, name)

    async def load_in_background():
        try:
            module = await asyncio.to_thread(_load, model)
        except Exception as e:  # noqa: BLE001 - reported by /health and every route, not a crash
            detail = str(e) if isinstance(e, BytelmError) else f"{type(e).__name__}: {e}"
            state.load_error = f"the model could not be loaded: {detail}"
            return
        engine = Engine(module, max_active=settings.max_active, max_queue=settings.max_queue,
                        workers=settings.workers, decode_step=decode_step, stall_timeout=settings.stall_timeout,
                        on_cycle=state.metrics.step_time)
        await asyncio.to_thread(engine.start)
        state.model, state.scorer, state.engine = module, Scorer(module, settings.max_queue), engine

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(load_in_background())
        if isinstance(model, torch.nn.Module):
            await task
        yield
        task.cancel()
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="bytelm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bytelm = state
    _install_error_handlers(app)
    app.add_middleware(ApiKeyCheck, key=settings.api_key)  # each added one wraps those before it
    app.add_middleware(_BodyLimitMiddleware, limit=settings.max_body_bytes)
    origins = _names(settings.allow_origin)
    if origins:  # answers preflights (before the key is asked for) and labels the answers for the browser
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(SiteGuard, hosts=HostCheck(settings.host, _names(settings.allow_host)), origins=origins)
    app.add_middleware(RequestCounter, metrics=state.metrics)  # outermost: refusals are counted too
    _add_routes(app, state)
    return app


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in err["loc"][1:]) or None
        return error_response(422, f"{field + ': ' if field else ''}{err['msg']}", field)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


class _BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, else as soon as the chunks pass it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over the limit of {self.limit:,} bytes (--max-body-bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await error_response(413, message)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, message)
            return msg

        return await self.app(scope, limited_receive, send)


def page_html() -> str:
    return resources.files("bytelm.serve").joinpath("web/index.html").read_text(encoding="utf-8")


_DISCONNECT_CHECK_S = 0.25  # how often a whole (not streamed) completion checks that its client is still there


def _sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _timings(stats: dict) -> dict:
    return {k: stats[k] for k in ("prompt_n", "prompt_ms", "queue_ms", "predicted_n", "predicted_ms",
                                  "predicted_per_second")}


def _final_fields(event: Finished) -> dict:
    return {"usage": usage_json(event.stats), "timings": _timings(event.stats), "seed": event.stats["seed"]}


async def _stream(handle: Generation, meta: dict, with_logprobs: bool, metrics: Metrics):
    """Server-sent events: completion chunks of whole characters, a last chunk with finish_reason, usage and
    timings, then `data: [DONE]`. Pieces that queued up while the client was being served go out as one chunk,
    so a busy server writes fewer, larger events instead of falling further behind. When the client goes
    away Starlette cancels this generator, and the `finally` drops the generation before its next byte."""
    try:
        while True:
            events = [await handle.next_event()] + handle.ready_events()
            pieces = [e for e in events if isinstance(e, Piece)]
            if pieces:
                piece = Piece.join(pieces)
                metrics.generated.inc(piece.n_bytes)
                choice = {"index": 0, "text": piece.text, "finish_reason": None,
                          "logprobs": logprobs_json(piece.infos) if with_logprobs else None}
                yield _sse_event({**meta, "choices": [choice]})
            end = events[-1]
            if isinstance(end, Finished):
                choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": end.reason}
                yield _sse_event({**meta, "choices": [choice], **_final_fields(end)})
            elif isinstance(end, Failed):
                yield _sse_event({"error": {"message": end.message, "type": "server_error", "param": None,
                                            "code": 500}})
            if not isinstance(end, Piece):
                break
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()


async def _collect(handle: Generation, meta: dict, request: Request, with_logprobs: bool, metrics: Metrics):
    """The whole completion as one JSON answer; checks for a vanished client while it waits."""
    text, infos = [], []
    next_check = time.monotonic() + _DISCONNECT_CHECK_S
    try:
        while True:
            try:
                event = await handle.next_event(timeout=_DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= next_check:  # by the clock: events may arrive faster than the timeout
                if await request.is_disconnected():
                    return error_response(400, "the client disconnected")  # nobody reads this
                next_check = time.monotonic() + _DISCONNECT_CHECK_S
            if event is None:
                continue
            if isinstance(event, Piece):
                metrics.generated.inc(event.n_bytes)
                text.append(event.text)
                infos.extend(event.infos)
            elif isinstance(event, Failed):
                return error_response(500, event.message)
            else:
                choice = {"index": 0, "text": "".join(text), "finish_reason": event.reason,
                          "logprobs": logprobs_json(infos) if with_logprobs else None}
                return {**meta, "choices": [choice], **_final_fields(event)}
    finally:
        handle.cancel()


def _add_routes(app: FastAPI, state: _State) -> None:
    html = page_html()
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": page_policy(html)}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(html, headers=page_headers)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "error" if state.load_error else "loading",
                                 "message": state.load_error or "the model is still loading"},
                                status_code=503, headers={"Retry-After": "1"})
        return {"status": "ok", **state.engine.stats()}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        state.ready()
        m = state.model
        return {"object": "list", "data": [{
            "id": state.name, "object": "model", "created": state.created, "owned_by": "bytelm",
            "parameters": m.num_params(), "context": m.config.block_size, "config": m.config.to_dict()}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = state.ready()
        body = await parse_body(request, CompletionBody)
        gen_request = generation_request(body, state.settings)
        try:
            handle = engine.submit(gen_request, asyncio.get_running_loop())
        except EngineBusy as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        meta = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": state.name}
        if body.stream:
            return StreamingResponse(_stream(handle, meta, body.logprobs is not None, state.metrics),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(handle, meta, request, body.logprobs is not None, state.metrics)

    @app.post("/v1/score")
    async def score(request: Request):
        state.ready()
        body = await parse_body(request, ScoreBody)
        data = text_bytes(body.text, "text", state.settings.max_prompt_bytes)
        check_score_size(len(data), body.top_k, state.settings.max_score_alternatives)
        gone = threading.Event()  # set when the client leaves: the scoring stops at its next chunk

        def answer() -> bytes:
            t0 = time.perf_counter()
            scores = state.scorer.score(data, body.top_k, gone)
            timings = {"ms": round((time.perf_counter() - t0) * 1000, 3)}
            state.metrics.scored.inc(len(data))
            return score_answer(scores, data, body, {"model": state.name}, {"timings": timings})

        try:
            with state.scorer.admitted():
                work = asyncio.ensure_future(asyncio.to_thread(answer))
                while not (await asyncio.wait({work}, timeout=_DISCONNECT_CHECK_S))[0]:
                    if await request.is_disconnected():
                        gone.set()
                return Response(await work, media_type="application/json")
        except ScoreBusy as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        except ClientGone:
            return error_response(400, "the client disconnected")  # nobody reads this
        finally:
            gone.set()  # a cancelled request stops its scoring too
