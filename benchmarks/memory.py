"""Memory measurement shared by the benchmarks: `/proc/<pid>/status` fields and a sampled peak of `RssAnon`.

Peak RSS (`VmHWM`) counts memory-mapped checkpoint pages, which are reclaimable file cache; `RssAnon` is what a
process allocates, so the benchmarks' memory targets refer to its sampled peak (docs/conventions.md, "Measuring
memory").
"""

from __future__ import annotations

import threading
import time


def status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class AnonSampler:
    """Peak of ``RssAnon`` of this process (or of process ``pid``) sampled in a background thread (torch kernels
    release the GIL, so it keeps sampling)."""

    def __init__(self, interval: float = 0.002, pid: int | str = "self"):
        self.interval, self.peak_kb, self.pid, self._stop = interval, 0, pid, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, status_kb("RssAnon", self.pid))
            except (FileNotFoundError, KeyError):  # the sampled process has exited (a zombie has no RssAnon)
                return
            time.sleep(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.pid == "self":
            self.peak_kb = max(self.peak_kb, status_kb("RssAnon"))
