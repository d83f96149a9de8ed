"""Memory measurement for the benchmarks: this process's resident set, now and at its highest while a block
runs (shared by bench_vae_tiling.py and bench_fp8.py)."""

from __future__ import annotations

import resource
import threading
from pathlib import Path


def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


class RssSampler:
    """The highest resident set size seen while it runs, polled every millisecond from a thread (ru_maxrss
    would also count the model's build and conversion, which can peak above a small decode)."""

    def __enter__(self) -> RssSampler:
        self.peak, self._stop = rss_now(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now())
