"""The peak memory of a process and all its descendants, for the benchmarks.

``TreePeak`` samples, from a thread, every ``every`` seconds while its ``with`` block
runs (and once more at its end), the summed RSS of a process tree and keeps the peak;
with ``pss=True`` also the summed PSS. RSS counts a page the processes share once per
process, so its sum errs high; PSS splits it between them (the tree's true footprint),
but costs more to read.

The benchmarks run as scripts (``python benchmarks/processes.py``), so this module is
imported as ``tree_memory``, found in the script's own directory. It imports psutil only
when a ``TreePeak`` is made, so a worker process that re-imports the script does not.
"""

from __future__ import annotations

import contextlib
import threading


class TreePeak:
    """The peak summed RSS (``peak``) and, with ``pss``, PSS (``peak_pss``), in bytes,
    of process ``pid`` (this process if ``None``) and all its descendants."""

    def __init__(self, pid: int | None = None, *, pss: bool = False, every: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self._pss = pss
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tree-peak", daemon=True)
        self.peak = 0
        self.peak_pss = 0

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        self._sample()
        while not self._stop.wait(self._every):
            self._sample()
        self._sample()

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            tree = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the root has exited
            return
        rss = pss = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if self._pss:
                    memory = process.memory_full_info()
                    pss += memory.pss
                else:
                    memory = process.memory_info()
                rss += memory.rss
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)
