"""Memory measurement shared by the benchmarks: `/proc/self/status` fields and a sampled peak of `RssAnon`.

Peak RSS (`VmHWM`) counts memory-mapped checkpoint pages, which are reclaimable file cache; `RssAnon` is what a
process allocates, so the benchmarks' memory targets refer to its sampled peak (SPEC 4).
"""

from __future__ import annotations

import threading
import time


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class AnonSampler:
    """Peak of ``RssAnon`` sampled in a background thread (torch kernels release the GIL, so it keeps sampling)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb("RssAnon"))
