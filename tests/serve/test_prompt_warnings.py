"""A prompt longer than the text encoder reads: the server tells the user which end was not read, in the
job (`warnings`), in the OpenAI-style answer, and in the history after a restart."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import Pipeline
from pictor.serve.store import QUEUED, SCHEMA_VERSION, JobRow, Store

# The pipeline also warns, to the server's log; here that is expected and only noise.
pytestmark = pytest.mark.filterwarnings("ignore::pictor.notices.PictorWarning")

TAIL = "and a green star"


def long_prompt(pipe: Pipeline) -> str:
    """More words than the tiny text encoder's tokens, ending in TAIL (which it does not read)."""
    return " ".join(["a red circle"] * pipe.text_encoder.max_length) + f" {TAIL}"


def test_a_cut_off_prompt_is_named_in_the_answer_and_the_job(client: TestClient, tiny: Pipeline) -> None:
    body = {"prompt": long_prompt(tiny), "steps": 1, "seed": 1, "response_format": "b64_json"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert warning.startswith(f"the prompt is longer than the text encoder's {tiny.text_encoder.max_length}")
    assert "not read" in warning and warning.endswith(f"{TAIL}'")
    assert warning == tiny.prompt_notices(body["prompt"], None)[0]  # the CLI's warning, word for word
    job = client.get(f"/v1/jobs/{r.json()['job_id']}").json()
    assert job["status"] == "succeeded" and job["warnings"] == [warning]
    assert client.get("/v1/jobs").json()["data"][0]["warnings"] == [warning]

    # a short prompt: nothing to say, and no extra field in the OpenAI-style answer
    short = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 1, "seed": 1})
    assert short.status_code == 200, short.text
    assert "warnings" not in short.json()
    assert client.get(f"/v1/jobs/{short.json()['job_id']}").json()["warnings"] == []


def test_a_cut_off_negative_prompt_through_the_job_api_and_its_events(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., dict[str, Any]]
) -> None:
    body = {"prompt": "a red circle", "negative_prompt": long_prompt(tiny), "steps": 1}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["warnings"] == []  # queued: the worker has not looked at it yet
    job = wait_job(client, r.json()["id"])
    (warning,) = job["warnings"]
    assert warning.startswith("the negative prompt is longer") and warning.endswith(f"{TAIL}'")
    events = client.get(f"/v1/jobs/{job['id']}/events").text
    done = json.loads(events.split("event: done\ndata: ", 1)[1].split("\n", 1)[0])
    assert done["warnings"] == [warning]


def test_an_edit_with_a_cut_off_prompt_is_told_too(client: TestClient, tiny: Pipeline) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    data = {"prompt": long_prompt(tiny), "strength": "0.5", "steps": "1", "response_format": "b64_json"}
    r = client.post("/v1/images/edits", files={"image": ("a.png", buf.getvalue(), "image/png")}, data=data)
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert warning.endswith(f"{TAIL}'")


def test_warnings_stay_in_the_history_after_a_restart(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    client = make_client(tiny)
    r = client.post("/v1/images/generations", json={"prompt": long_prompt(tiny), "steps": 1})
    assert r.status_code == 200, r.text
    job_id, warnings = r.json()["job_id"], r.json()["warnings"]
    make_client.close(client)
    again = make_client(tiny)
    assert again.get(f"/v1/jobs/{job_id}").json()["warnings"] == warnings


def test_a_data_dir_from_before_warnings_opens_and_gains_them(tmp_path: Path) -> None:
    """A history written before jobs had warnings (same schema version, no column) is read, its jobs with
    none, and its new jobs keep theirs; an older pictor can still read and write it (named columns)."""
    with sqlite3.connect(tmp_path / "pictor.db") as db:
        db.executescript(
            """CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, started REAL, finished REAL,
            status TEXT NOT NULL, prompt TEXT NOT NULL, params TEXT NOT NULL, user TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, error TEXT, results TEXT NOT NULL DEFAULT '[]');"""
        )
        db.execute(
            "INSERT INTO jobs (id, created, status, prompt, params) VALUES (?, ?, ?, ?, ?)",
            ("a" * 32, 1.0, QUEUED, "old", json.dumps({"prompt": "old", "n": 1})),
        )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.close()
    store = Store(tmp_path)
    old = store.get_job("a" * 32)
    assert old is not None and old.warnings == []
    store.add_job(JobRow("b" * 32, time.time(), QUEUED, {"prompt": "new", "n": 1}))
    notice = "the prompt is longer than ...; this end of it is not read: 'x'"
    store.mark_running(["b" * 32], 2.0, [notice])
    store.close()
    again = Store(tmp_path)  # opening twice adds nothing twice
    new = again.get_job("b" * 32)
    assert new is not None and new.warnings == [notice]
    again.close()
    with sqlite3.connect(tmp_path / "pictor.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_job_whose_seeds_pass_32_bits_is_told_they_repeat_smaller_ones(client: TestClient) -> None:
    """Seeds 2**32 and up give the images of seed mod 2**32 (the noise generator reads 32 bits); a job whose
    seeds reach there is told; one whose seeds stay below is not."""
    body = {"prompt": "a red circle", "steps": 1, "seed": 2**32 - 1, "n": 2, "response_format": "b64_json"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert warning.startswith("seed 4294967296 gives the image of seed 0") and "low 32 bits" in warning
    assert client.get(f"/v1/jobs/{r.json()['job_id']}").json()["warnings"] == [warning]
    fine = client.post("/v1/images/generations", json={**body, "seed": 2**32 - 2})
    assert fine.status_code == 200, fine.text
    assert "warnings" not in fine.json()
