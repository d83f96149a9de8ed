"""History: jobs and images in SQLite (WAL), image files as provenance PNGs under the data dir.

Layout::

    DATA_DIR/pictor.db            jobs, images (one row per PNG), schema version in user_version
    DATA_DIR/images/ab/abcd....png  one PNG per image id (uuid hex), written atomically by save_png
    DATA_DIR/uploads/abcd....png    images sent to /v1/images/edits (source, mask), reference pictures,
                                  Kontext context, control, Redux and IP-Adapter pictures, pictures to
                                  upscale (with their pictor record), kept while their job is unfinished or
                                  in the history as succeeded (serve/upload_retention.py)

Every state change is committed before anyone is told about it (the 202, an event, a result), so a job that
was accepted survives a crash: `unfinished()` gives it back on the next start.

One connection serves all threads behind a lock; SQLite calls are short and the worker thread does the
long work outside it.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pictor.provenance import png_info, save_png

SCHEMA_VERSION = 1
ID_RE = re.compile(r"^[0-9a-f]{32}$")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL,
    user TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    results TEXT NOT NULL DEFAULT '[]',
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_job ON images (job_id);
"""

# Columns added to `jobs` since schema version 1 was first written, with their declarations. Each has a
# default, and pictor names the columns it writes and reads rows by name, so a data dir with them is still
# version 1: an older pictor opens it and ignores them, a newer one adds them to an older data dir.
_ADDED_JOB_COLUMNS = {
    "warnings": "TEXT NOT NULL DEFAULT '[]'",  # notices for the user, e.g. the end of a prompt not read
}


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(text: str) -> bool:
    return bool(ID_RE.match(text))


@dataclass
class JobRow:
    id: str
    created: float
    status: str
    params: dict[str, Any]
    user: str | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: dict[str, Any] | None = None
    # [{"image_id": ..., "seed": ...}], in the order of the request's images
    results: list[dict[str, Any]] = field(default_factory=list)
    # What the user should know about how the request was run (a prompt cut off by the text encoder):
    # sentences the worker sets when the job starts to run.
    warnings: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return str(self.params.get("prompt", ""))

    @property
    def n(self) -> int:
        return int(self.params.get("n", 1))


@dataclass
class ImageRow:
    id: str
    job_id: str
    index: int
    seed: int
    created: float
    record: dict[str, Any]


class StoreError(RuntimeError):
    """The data dir cannot be used (wrong schema version, unwritable...)."""


class Store:
    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.images_dir = self.data_dir / "images"
        self.uploads_dir = self.data_dir / "uploads"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.data_dir / "pictor.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an accepted job (its 202 already sent) must survive a power cut, not just a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(
                    f"{self.data_dir}: history schema version {version}, this pictor reads version "
                    f"{SCHEMA_VERSION}; use another --data-dir"
                )
            self._db.executescript(_SCHEMA)
            self._add_columns()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _add_columns(self) -> None:
        """Give a data dir written before a column was added that column (see _ADDED_JOB_COLUMNS)."""
        # One write transaction: two servers opening the same old data dir at once cannot both add it.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, declaration in _ADDED_JOB_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs --------------------------------------------------------------------------------------

    def add_job(self, job: JobRow) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, created, status, prompt, params, user, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.created, job.status, job.prompt, json.dumps(job.params), job.user, job.attempts),
            )

    def get_job(self, job_id: str) -> JobRow | None:
        if not valid_id(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, limit: int = 20, offset: int = 0, query: str = "") -> tuple[list[JobRow], int]:
        """Newest first; ``query`` matches a substring of the prompt (case-insensitive for ASCII)."""
        where, args = "", []
        if query:
            where = "WHERE prompt LIKE ? ESCAPE '\\'"
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY created DESC, rowid DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [_job(r) for r in rows], int(total)

    def unfinished(self) -> list[JobRow]:
        """Queued and running jobs, oldest first: what a restart must resume."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created, rowid", (QUEUED, RUNNING)
            ).fetchall()
        return [_job(r) for r in rows]

    def counts_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    def mark_running(self, job_ids: Iterable[str], started: float, warnings: list[str] | None = None) -> None:
        """Count the attempt before the work starts, so a crash during it is remembered; ``warnings`` are
        the run's notices for its jobs' users (set anew on every attempt: the model may have changed)."""
        notices = json.dumps(warnings or [])
        with self._lock:
            self._db.executemany(
                "UPDATE jobs SET status = ?, started = ?, attempts = attempts + 1, warnings = ? "
                "WHERE id = ? AND status = ?",
                [(RUNNING, started, notices, i, QUEUED) for i in job_ids],
            )

    def params_of(self, status: str) -> Iterator[dict[str, Any]]:
        """The settings of every job in `status` (for the upload sweep at start)."""
        with self._lock:
            rows = self._db.execute("SELECT params FROM jobs WHERE status = ?", (status,)).fetchall()
        for row in rows:
            yield json.loads(row["params"])

    def delete_job(self, job_id: str) -> tuple[JobRow, list[str]] | None:
        """Remove a finished job and its images' rows from the history; (the job, its image ids), or None
        when there is no such finished job. The caller deletes the files."""
        if not valid_id(job_id):
            return None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT * FROM jobs WHERE id = ? AND status IN ({', '.join('?' * len(TERMINAL))})",
                    (job_id, *sorted(TERMINAL)),
                ).fetchone()
                images = [
                    r["id"] for r in self._db.execute("SELECT id FROM images WHERE job_id = ?", (job_id,))
                ]
                if row is not None:
                    self._db.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
                    self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return (_job(row), images) if row is not None else None

    def requeue(self, job_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, started = NULL WHERE id = ? AND status = ?",
                (QUEUED, job_id, RUNNING),
            )

    def finish(
        self,
        job_id: str,
        status: str,
        error: dict[str, Any] | None = None,
        images: list[ImageRow] | None = None,
        finished: float | None = None,
    ) -> bool:
        """Move an unfinished job to a final state; False when it already was final (e.g. cancelled)."""
        assert status in TERMINAL
        images = images or []
        results = [{"image_id": im.id, "seed": im.seed} for im in images]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ?, results = ? "
                    "WHERE id = ? AND status IN (?, ?)",
                    (
                        status,
                        finished or time.time(),
                        json.dumps(error) if error else None,
                        json.dumps(results),
                        job_id,
                        QUEUED,
                        RUNNING,
                    ),
                )
                if cur.rowcount:
                    self._db.executemany(
                        "INSERT INTO images (id, job_id, idx, seed, created, record) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            (im.id, job_id, im.index, im.seed, im.created, json.dumps(im.record))
                            for im in images
                        ],
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(cur.rowcount)

    # -- images ------------------------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        """Where an image id's PNG lives. Ids are uuid hex, so the path cannot leave images/."""
        if not valid_id(image_id):
            raise ValueError(f"image id must be 32 lowercase hex characters, got {image_id!r}")
        return self.images_dir / image_id[:2] / f"{image_id}.png"

    def write_image(self, image: Image.Image, record: dict[str, Any]) -> str:
        """Write a PNG with its provenance; the row is added when its job finishes."""
        image_id = new_id()
        save_png(image, record, self.image_path(image_id))
        return image_id

    def upload_path(self, upload_id: str) -> Path:
        if not valid_id(upload_id):
            raise ValueError(f"upload id must be 32 lowercase hex characters, got {upload_id!r}")
        return self.uploads_dir / f"{upload_id}.png"

    def write_upload(self, image: Image.Image, record: dict[str, Any] | None = None) -> str:
        """Keep an uploaded image (as PNG) for its job: see `upload_retention` for how long. `record`: its
        pictor record, kept in it as in the images pictor writes (a picture sent to be upscaled)."""
        upload_id = new_id()
        path = self.upload_path(upload_id)
        tmp = path.with_name(f".{path.name}.tmp")
        info = png_info(record) if record is not None else None
        try:
            image.save(tmp, format="PNG", pnginfo=info)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
            raise
        return upload_id

    def get_image(self, image_id: str) -> ImageRow | None:
        if not valid_id(image_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            return None
        return ImageRow(
            row["id"], row["job_id"], row["idx"], row["seed"], row["created"], json.loads(row["record"])
        )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _sendable(value: Any) -> Any:
    """Lone surrogates (U+D800..U+DFFF, which a JSON escape could carry into the params of jobs stored
    before requests were checked for them) replaced by U+FFFD: such a string cannot be sent as UTF-8, and
    one stored job would make every history page that holds it fail."""
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_sendable(v) for v in value]
    if isinstance(value, dict):
        return {k: _sendable(v) for k, v in value.items()}
    return value


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"],
        created=row["created"],
        status=row["status"],
        params=_sendable(json.loads(row["params"])),
        user=row["user"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        error=_sendable(json.loads(row["error"])) if row["error"] else None,
        results=json.loads(row["results"] or "[]"),
        warnings=_sendable(json.loads(row["warnings"] or "[]")),
    )
