"""Throughput and latency of `pictor serve` under concurrent clients, with and without request batching.

Starts `pictor serve` as a subprocess (pinned to --cores CPUs), then for 1, 4 and 16 concurrent clients
sends --requests per client to POST /v1/images/generations (the same prompt, no seed: the requests the
server may merge into one sampler run) and measures:

- images_per_s: images delivered / wall time of the round;
- p50_s, p95_s: per-request latency (submit -> images back), client side;
- mean_batch: images per sampler run, from the server's /metrics.

"batching": --max-batch 1 (off) vs --max-batch B (on). With --apis openai,a1111 each round runs again through
A1111's POST /sdapi/v1/txt2img with the same settings (its answer carries every image as base64 PNG and an
`info` text: what an A1111 client pays), side by side. Prints one JSON document.

Usage: python benchmarks/bench_serve.py [--model tiny] [--cores 2] [--requests 8] [--max-batch 8]
                                        [--apis openai,a1111]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def start_server(model: str, data_dir: Path, max_batch: int, cores: int, log: Path) -> tuple[Any, str]:
    command = [
        sys.executable,
        "-m",
        "pictor.cli",
        "serve",
        "--model",
        model,
        "--device",
        "cpu",
        "--port",
        "0",
    ]
    command += ["--data-dir", str(data_dir), "--max-batch", str(max_batch), "--queue-size", "256"]
    command += ["--log-level", "warning"]

    def pin() -> None:
        if cores < (os.cpu_count() or cores):
            os.sched_setaffinity(0, range(cores))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cores)}
    out = open(log, "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        m = re.search(r"listening on (http://\S+?)/? ", log.read_text())
        if m:
            url = m.group(1)
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready in 120 s")


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    values = dict(re.findall(r"^(pictor_batch_images_(?:sum|count)) (\S+)$", text, re.M))
    return float(values["pictor_batch_images_sum"]), float(values["pictor_batch_images_count"])


# Where each API's requests go, and the A1111 body for the same settings as the OpenAI one.
ROUTES = {"openai": "/v1/images/generations", "a1111": "/sdapi/v1/txt2img"}


def a1111_body(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": body["prompt"], "batch_size": body.get("n", 1)}
    if "steps" in body:
        out["steps"] = body["steps"]
    if "size" in body:
        out["width"], out["height"] = (int(v) for v in body["size"].split("x"))
    return out


def run_round(
    url: str, clients: int, requests: int, body: dict[str, Any], api: str = "openai"
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for _ in range(requests):
                t0 = time.perf_counter()
                r = http.post(ROUTES[api], json=body if api == "openai" else a1111_body(body))
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    images0, runs0 = batch_stats(url)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    images1, runs1 = batch_stats(url)
    latencies.sort()
    n = len(latencies)
    return {
        "api": api,
        "clients": clients,
        "requests": clients * requests,
        "ok": n,
        "errors": errors[:3],
        "wall_s": round(wall, 3),
        "images_per_s": round(n * body.get("n", 1) / wall, 2),
        "p50_s": round(statistics.median(latencies), 4) if n else None,
        "p95_s": round(latencies[min(n - 1, int(0.95 * n))], 4) if n else None,
        "mean_batch": round((images1 - images0) / max(1.0, runs1 - runs0), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=8, help="requests per client per round")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching-on setting")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT; default: the model's")
    parser.add_argument("--apis", default="openai", help="openai, a1111 or both (comma-separated)")
    args = parser.parse_args()
    apis = args.apis.split(",")
    if not apis or set(apis) - set(ROUTES):
        parser.error(f"--apis takes {' and '.join(ROUTES)}, comma-separated")
    body: dict[str, Any] = {"prompt": "a red circle left of a blue square", "response_format": "url"}
    if args.steps:
        body["steps"] = args.steps
    if args.size:
        body["size"] = args.size

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for batching, max_batch in ((False, 1), (True, args.max_batch)):
            data = Path(tmp) / f"data-{max_batch}"
            proc, url = start_server(args.model, data, max_batch, args.cores, Path(tmp) / f"log-{max_batch}")
            try:
                for _ in range(3):  # warm-up: first-call allocations, caches
                    httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
                for clients in (int(c) for c in args.clients.split(",")):
                    for api in apis:
                        row = run_round(url, clients, args.requests, body, api)
                        results.append({"batching": batching, "max_batch": max_batch, **row})
                        print(json.dumps(results[-1]), file=sys.stderr)
                card = httpx.get(f"{url}/v1/models").json()["data"][0]
            finally:
                proc.terminate()
                proc.wait(60)
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "model": args.model,
                "defaults": card["defaults"],
                "request": body,
                "cores": args.cores,
                "cpu_count": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
