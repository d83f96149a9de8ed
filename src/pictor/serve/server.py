"""Run the app on uvicorn: claim the data dir, bind, say where, drain on SIGTERM."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import IO

import uvicorn

from pictor.serve.app import create_app
from pictor.serve.jobs import JobManager
from pictor.serve.settings import ServeSettings


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, stop taking jobs at once, finish the running batch, then stop uvicorn.

    uvicorn closes its listening socket as soon as it is told to exit, so a client that connects during
    the drain would get "connection refused" and could not tell a stopping server from a dead one. The
    socket stays open until the running batch is done: meanwhile new jobs get a 503 that says the server
    is shutting down and /readyz says "draining". A second signal skips the wait and goes straight to
    uvicorn's own shutdown.
    """

    def __init__(self, config: uvicorn.Config, manager: JobManager, grace: float) -> None:
        super().__init__(config)
        self.manager = manager
        self.grace = grace
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # From another thread: a signal handler must not take locks the interrupted code may hold, and
        # must not block the event loop that answers the 503s.
        threading.Thread(target=self._drain_then_exit, args=(sig, frame), name="pictor-drain").start()

    def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        # While the model is still loading there is no batch to wait for.
        self.manager.stop(self.grace if self.manager.ready else 0)
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


LOCK_FILE = "server.lock"


def claim_data_dir(data_dir: Path) -> IO[str] | None:
    """An exclusive lock on the data dir for as long as this process runs (the OS drops it when the process
    ends, SIGKILL too), so that a second server on the same folder is refused before it opens the history:
    it would take the first one's running jobs for a crash's leftovers and run them again, and clear uploads
    the first still reads. None where the platform has no flock (the folder is then not guarded)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks of this kind
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until the server ends)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "pid unknown"
        handle.close()
        raise ValueError(
            f"--data-dir {data_dir}: another pictor server is using it ({holder}); stop that one, or give "
            "this one another --data-dir"
        ) from None
    return handle


def _note_holder(handle: IO[str] | None, text: str) -> None:
    """Who holds the lock, for the message a refused second server prints."""
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        handle.write(text + "\n")
        handle.flush()


def serve(settings: ServeSettings, log_level: str = "info") -> int:
    """Blocks until the server is stopped. Bad settings raise ValueError with the reason."""
    from pictor.checkpoint import read_bundle_config
    from pictor.generation_settings import tiling_problem
    from pictor.locate import resolve
    from pictor.presets import get_preset

    settings.check_exposure()
    ref = resolve(settings.model)  # an unknown model fails here, before anything listens
    if settings.vae_tile is not None:  # so does a tile size its autoencoder cannot use
        ae = (
            get_preset(ref.name)["autoencoder"]
            if ref.path is None
            else read_bundle_config(ref.path).autoencoder
        )
        factor = 2 ** (len(ae["ch_mult"]) - 1)
        problem = tiling_problem(factor, settings.vae_tile, settings.vae_tile_overlap)
        if problem:
            raise ValueError(f"--vae-tile: {problem}")
    for path, what, exists in (
        (settings.redux_model, "--redux-model", Path.is_file),
        (settings.siglip, "--siglip", Path.is_dir),
        (settings.ip_adapter_model, "--ip-adapter-model", Path.is_file),
        (settings.clip_vision, "--clip-vision", Path.is_dir),
        (settings.upscaler, "--upscaler", Path.is_file),
    ):  # missing ones are named before anything listens; what is inside is checked when the model loads
        if path is not None and not exists(path):
            raise ValueError(f"{what} {path}: no such {'file' if exists is Path.is_file else 'folder'}")
    for path in settings.controlnets:  # likewise: a ControlNet file or diffusers folder
        if not path.exists():
            raise ValueError(f"--controlnet {path}: no such file or folder")
    lock = claim_data_dir(Path(settings.data_dir).expanduser())  # before the history is opened
    try:
        return _serve(settings, log_level, lock)
    finally:
        if lock is not None:
            lock.close()


def _serve(settings: ServeSettings, log_level: str, lock: IO[str] | None) -> int:
    app = create_app(settings)
    library = app.state.service.library
    for name, why in library.unusable.items():
        print(f"pictor serve: LoRA {name} left out: {why}", file=sys.stderr)
    if settings.lora_dir is not None:
        print(f"pictor serve: LoRAs offered: {', '.join(library.files) or 'none'}", file=sys.stderr)
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    # One line a script (or a test using --port 0) can read to find the server.
    print(f"pictor serve: listening on http://{host}:{port}/ (data dir {settings.data_dir})", flush=True)
    _note_holder(lock, f"pid {os.getpid()}, http://{host}:{port}/")
    if settings.api_key is None:
        print("pictor serve: no API key: anyone on this machine can use the server", file=sys.stderr)
    grace = max(5, int(settings.job_timeout) + 5)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        # Requests still in flight once the running batch is done get this long to be answered.
        timeout_graceful_shutdown=grace,
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.service.manager, grace)
    server.run(sockets=[sock])
    return 0
