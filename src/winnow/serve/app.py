"""Thin HTTP routes over :mod:`winnow.serve.serving`, and ``run_server`` (uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/rewards``. Every error leaves as OpenAI's JSON error shape.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import resource
import signal
import socket
import sys
from typing import Any

import pydantic
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from winnow.serve import protocol as p
from winnow.serve.guard import BodyGuard, ConnectionGuard, GuardedH11Protocol
from winnow.serve.serving import ServingError, load_serving

log = logging.getLogger("winnow.serve")


def _error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    err = ServingError(status, message, type=type, param=param, code=code, headers=headers)
    return JSONResponse(err.body(), status_code=status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 naming the first bad parameter (a value error first: in a union it says more than the
    type errors of the other branches); a body that is not JSON says so."""
    errors = exc.errors()
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return _error(
            400,
            f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
            code="invalid_json",
        )
    # a union field (str | list[str]) puts the failed branch's type name in the path: leave it out
    param = ""
    for part in first.get("loc", ())[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _is_type_name(part):
            param += f".{part}" if param else str(part)
    if not param:
        return _error(
            400,
            f"the request body must be a JSON object of the route's fields ({first.get('msg')})",
            code="invalid_value",
        )
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = "field required"
    return _error(400, f"{param}: {message}", param=param, code="invalid_value")


def _is_type_name(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none")


async def _read(request: Request, model: type[pydantic.BaseModel], route: str, serving: Any) -> Any:
    """The request body as ``model``: parsed as JSON, its sizes checked (``serving.check_sizes``)
    before it becomes objects, then validated. Run inside the route, so after the key check: an
    unauthenticated body is never parsed."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # or cut off by BodyGuard, which then sends its own answer
        raise ServingError(400, "the client went away before sending the whole body", code="incomplete_body") from None
    try:
        data = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ServingError(400, f"the request body is not valid JSON ({e.msg})", code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, a number too long to read, nesting too deep
        raise ServingError(
            400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})", code="invalid_json"
        ) from None
    serving.check_sizes(route, data)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def create_app(
    serving: Any, api_key: str | None = None, *, max_request_bytes: int = 32 * 1024 * 1024, timeout_body: float = 60.0
) -> FastAPI:
    """The FastAPI application serving ``serving`` (a policy or reward model), its bodies capped
    at ``max_request_bytes`` and ``timeout_body`` seconds."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await serving.aclose()

    app = FastAPI(title="winnow serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyGuard, max_bytes=max_request_bytes, timeout_body=timeout_body)

    async def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "No API key provided" if not header else "Incorrect API key provided"
            raise ServingError(401, f"{what}; send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.exception_handler(ServingError)
    async def on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return serving.info()

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return serving.models().model_dump()

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str) -> dict[str, Any]:
        serving.check_model(model)
        return serving.models().data[0].model_dump()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        return _respond(await serving.chat(await _read(request, p.ChatCompletionRequest, "chat", serving)))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return _respond(await serving.completions(await _read(request, p.CompletionRequest, "completions", serving)))

    @app.post("/v1/rewards", dependencies=auth)
    async def rewards(request: Request):
        return _respond(await serving.rewards(await _read(request, p.RewardRequest, "rewards", serving)))

    return app


def _respond(result: Any):
    if hasattr(result, "model_dump"):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- running


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket, not listening yet; port 0 lets the OS pick a free one (the ready line says which)."""
    from winnow.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _connection_cap(wanted: int) -> int:
    """``--max_connections``, lowered to leave the process file descriptors for its own files (the
    cap must bite before the descriptor limit does, or accepting fails for everyone)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - 64 if soft != resource.RLIM_INFINITY else wanted
    if wanted > room:
        log.warning(
            "--max_connections %d is over what the open-file limit (%d) allows; using %d", wanted, soft, max(1, room)
        )
        return max(1, room)
    return wanted


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(config: Any) -> int:
    """``winnow serve``: load the model, bind, print one ready line, serve until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.DEBUG if config.debug else logging.INFO, format="winnow serve: %(levelname)s %(message)s"
    )

    def stop_loading(signum, frame):
        raise KeyboardInterrupt

    # the port is taken before the (slow) model load, so a busy port fails at once; it listens
    # only once the model is ready, so early clients are refused rather than left hanging
    sock = _bind(config.host, config.port)
    # a signal while the model loads stops the server cleanly too (uvicorn takes over once serving)
    previous = {sig: signal.signal(sig, stop_loading) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serving = load_serving(config)
    except KeyboardInterrupt:
        sock.close()
        print("winnow serve: stopped while loading the model", file=sys.stderr)
        return 0
    except BaseException:
        sock.close()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sock.listen(2048)
    sock.setblocking(False)
    url = _url(sock)
    app = create_app(
        serving, config.api_key, max_request_bytes=config.max_request_bytes, timeout_body=config.timeout_body
    )
    guard = ConnectionGuard(
        max_connections=_connection_cap(config.max_connections), timeout_headers=config.timeout_headers
    )
    uv_config = uvicorn.Config(
        app,
        log_level="info" if config.debug else "warning",
        access_log=config.debug,
        timeout_graceful_shutdown=30,
        lifespan="on",
        # uvicorn calls http(config=..., server_state=...): a partial works as well as
        # the class it declares
        http=functools.partial(GuardedH11Protocol, guard=guard),  # type: ignore[arg-type]
        timeout_keep_alive=config.timeout_keep_alive,
    )
    server = _Server(
        uv_config, ready=f"winnow serve: ready at {url}/v1 (model '{serving.name}', {serving.kind}; GET {url}/health)"
    )
    server.run(sockets=[sock])
    print("winnow serve: stopped", file=sys.stderr, flush=True)
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server with winnow's ready line, exiting 0 (not re-raising) on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, ready: str):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(self.ready, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after a graceful stop; a server asked to stop has done its
        # job, so the process exits 0 instead
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
