"""The memory of a process tree: a compression and the worker processes it starts.

``ru_maxrss`` (from ``os.wait4``) is exact but is the largest single process; a compression with
workers holds the main process and its workers at once, so the benchmarks also sample the summed
RSS of the whole tree from /proc. A sample every 0.2 s can miss a peak shorter than that: the
summed figure is a lower bound, the single-process one exact.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

#: Seconds between two samples of the tree.
INTERVAL_S = 0.2


def tree_rss_kib(root: int) -> int:
    """Summed RSS of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * 4
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [child for child, parent in parents.items() if parent == pid and child not in tree]
    return sum(rss.get(pid, 0) for pid in tree)


class TreePeak:
    """``with TreePeak(pid) as peak:`` samples the tree below ``pid`` until the block ends; ``peak.mib``."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.kib = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def mib(self) -> float:
        return self.kib / 1024

    def _sample(self) -> None:
        while not self._done.wait(INTERVAL_S):
            self.kib = max(self.kib, tree_rss_kib(self.root))

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
