"""Measuring helpers the benches share: machine load, and the peak resident memory of a block."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PACKAGE_FOLDERS = ("alignflow", "schemas", "feedback", "trainers", "flows")


def compile_checkout(root: Path) -> str:
    """Write the checkout's bytecode before timing processes that import it, as ``pip install``
    does for an installed package. An editable install compiles on first import instead, and
    where ``PYTHONDONTWRITEBYTECODE`` is set (this machine) on every import: 0.1-0.15 s of each
    ``alignflow convert`` process here, a cost no installed user pays."""
    folders = [str(root / f) for f in PACKAGE_FOLDERS if (root / f).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=True, stdout=subprocess.DEVNULL)
    return f"bytecode of {root} compiled beforehand (as pip install does)"


def machine_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"machine load at start: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min), {os.cpu_count()} CPUs"


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.peak`` (MB, this process, sampled every 5 ms) and
    ``m.added`` (peak minus the resident memory at entry): what the block itself needed."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.added = self.peak - self.start
