"""Run the app on uvicorn: bind, say where, drain on SIGTERM."""

from __future__ import annotations

import socket
import sys
import threading
from types import FrameType

import uvicorn

from pictor.serve.app import create_app
from pictor.serve.jobs import JobManager
from pictor.serve.settings import ServeSettings


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, stop taking jobs at once (503), then let uvicorn finish what is in flight."""

    def __init__(self, config: uvicorn.Config, manager: JobManager) -> None:
        super().__init__(config)
        self.manager = manager

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # From another thread: a signal handler must not take locks the interrupted code may hold.
        threading.Thread(target=self.manager.begin_drain, name="pictor-drain").start()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP;
    # with proto 0 every small response waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings, log_level: str = "info") -> int:
    """Blocks until the server is stopped. Bad settings raise ValueError with the reason."""
    from pictor.locate import resolve

    settings.check_exposure()
    resolve(settings.model)  # an unknown model fails here, before anything listens
    app = create_app(settings)
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    # One line a script (or a test using --port 0) can read to find the server.
    print(f"pictor serve: listening on http://{host}:{port}/ (data dir {settings.data_dir})", flush=True)
    if settings.api_key is None:
        print("pictor serve: no API key: anyone on this machine can use the server", file=sys.stderr)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        # In-flight requests get this long after SIGTERM; the running job is awaited by the lifespan.
        timeout_graceful_shutdown=max(5, int(settings.job_timeout) + 5),
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.service.manager)
    server.run(sockets=[sock])
    return 0
