"""The HTTP side of ``recsys serve`` (aiohttp): routes, JSON errors, startup and shutdown.

Endpoints:

* ``POST /score``: a JSON body (see :mod:`recsys.serve.service`) -> ``{"scores": {task: [p,
  ...]}, "model": ..., "rows": n}``. Bad requests get a JSON ``{"error", "field", "row"}``: 400
  for a body that is not JSON, 413 for one over ``max_body_bytes``, 422 for a value the model
  cannot take; the server keeps serving.
* ``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded and warmed up; 503 while it
  shuts down.
* ``GET /metadata``: the model, its input fields, tasks, spec hash, versions, batching settings
  and counters.

aiohttp is used rather than a hand-written server: asyncio native, one dependency, and it
enforces the body limit while reading. The model is loaded and warmed up before the port is
opened, so a client never sees a half-loaded server; SIGINT / SIGTERM stop it gracefully: no new
connections, in-flight requests are answered, then the batchers and the model thread stop.

Example:
    >>> summary = run_server("exports/qs", ServeConfig(port=8080))   # until Ctrl-C
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from recsys.errors import UsageError
from recsys.process_settings import tune_process
from recsys.serve.batching import ShuttingDown
from recsys.serve.schema import RequestError
from recsys.serve.service import ScoringService, ServeConfig

log = logging.getLogger("recsys.serve")
SERVICE = web.AppKey("service", ScoringService)
ENDPOINTS = "POST /score, GET /health, GET /metadata"
SHUTDOWN_TIMEOUT_S = 30.0  # in-flight requests get this long to finish on shutdown

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as a JSON body; an unexpected one is logged and answered 500, and the server
    goes on."""
    try:
        return await handler(request)
    except RequestError as e:
        return web.json_response(e.body(), status=e.status)
    except ShuttingDown as e:
        return web.json_response({"error": str(e)}, status=503)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text or e.reason
        if e.status in (404, 405):
            message = f"no endpoint {request.method} {request.path}; this server has {ENDPOINTS}"
        return web.json_response({"error": message}, status=e.status, headers=_allow(e))
    except Exception as e:  # noqa: BLE001 - a bug must not take the server down
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"},
                                 status=500)


def _allow(e: web.HTTPException) -> dict[str, str]:
    allow = e.headers.get("Allow")
    return {"Allow": allow} if allow else {}


async def score(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    limit = service.cfg.max_body_bytes
    too_large = RequestError(413, f"the body is larger than the server's limit of {limit:,} "
                             "bytes (--max-body-bytes); send fewer rows per request")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
        raise too_large from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    return web.json_response(await service.score(body))


async def health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if not service.ready:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "model": service.model_name})


async def metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].metadata())


def build_app(service: ScoringService) -> web.Application:
    """The aiohttp application over a loaded service.

    Example:
        >>> app = build_app(ScoringService.load("exports/qs", ServeConfig()))
    """
    app = web.Application(client_max_size=service.cfg.max_body_bytes, middlewares=[json_errors])
    app[SERVICE] = service
    app.router.add_post("/score", score)
    app.router.add_get("/health", health)
    app.router.add_get("/metadata", metadata)
    return app


async def serve(export_dir: str | Path, cfg: ServeConfig, stop: asyncio.Event | None = None,
                on_ready: Callable[[str, ScoringService], None] | None = None,
                handle_signals: bool = False) -> ScoringService:
    """Load and warm up the export, listen, and serve until ``stop`` is set (or, with
    ``handle_signals``, SIGINT / SIGTERM); then shut down gracefully.

    Args:
        export_dir: what ``recsys export`` wrote.
        cfg: where to listen and how to batch.
        stop: set it to stop the server (one is made when None).
        on_ready: called with the URL (``http://host:port``) once the server listens.
        handle_signals: stop on SIGINT / SIGTERM (only from the main thread).

    Returns:
        The stopped service (its ``summary()`` and ``stats()``).

    Raises:
        DataError: the export directory is not a loadable export.
        UsageError: the address cannot be listened on (the port is taken, ...).
    """
    tune_process()  # requests allocate and free the same tensors, as training steps do
    service = ScoringService.load(export_dir, cfg)
    service.warm_up()
    stop = stop or asyncio.Event()
    runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
    except OSError as e:
        await runner.cleanup()
        raise _listen_error(cfg, e) from None
    service.start()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for s in signals:
        loop.add_signal_handler(s, stop.set)
    try:
        host, port = runner.addresses[0][:2]
        if on_ready is not None:
            on_ready(f"http://{_url_host(host)}:{port}", service)
        await stop.wait()
    finally:
        service.ready = False  # /health: 503 while draining
        await runner.cleanup()  # stops listening; in-flight requests finish
        await service.stop()
        for s in signals:
            loop.remove_signal_handler(s)
    return service


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listen_error(cfg: ServeConfig, e: OSError) -> UsageError:
    where = f"{cfg.host}:{cfg.port}"
    if e.errno == errno.EADDRINUSE:
        return UsageError(f"--port {cfg.port}: {where} is already in use (another server?); "
                          "choose another port, or --port 0 for any free one")
    return UsageError(f"--host/--port: cannot listen on {where}: {e.strerror or e}")


def run_server(export_dir: str | Path, cfg: ServeConfig) -> ScoringService:
    """:func:`serve` in the foreground until SIGINT / SIGTERM, printing the URL when ready.

    Example:
        >>> print(run_server("exports/qs", ServeConfig(port=8080)).summary())
    """

    def ready(url: str, service: ScoringService) -> None:
        m = service.predictor.manifest
        print(f"serving {export_dir} ({m.get('arch')}, tasks {', '.join(service.predictor.tasks)}"
              f"{', two-tower candidates' if service.two_tower else ''}) at {url} ({ENDPOINTS}); "
              "Ctrl-C to stop", flush=True)

    return asyncio.run(serve(export_dir, cfg, on_ready=ready, handle_signals=True))


class BackgroundServer:
    """:func:`serve` on a thread of its own (tests, notebooks, embedding in another program).

    Example:
        >>> with BackgroundServer("exports/qs", ServeConfig(port=0)) as server:
        ...     requests.post(f"{server.url}/score", json={"rows": [row]})
    """

    def __init__(self, export_dir: str | Path, cfg: ServeConfig) -> None:
        self.export_dir, self.cfg = export_dir, cfg
        self.url = ""
        self.service: ScoringService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="recsys-serve", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve(self.export_dir, self.cfg, self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
        finally:
            self._ready.set()

    def _on_ready(self, url: str, service: ScoringService) -> None:
        self.url, self.service = url, service
        self._ready.set()

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        """Start and wait until the server listens (what it raised on the way, re-raised)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully and wait for the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # (the loop already closed)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
