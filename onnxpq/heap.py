"""The process's heap: giving freed memory back to the system between stages.

glibc's malloc keeps what a program frees for its own later use, so after a stage of large temporaries
(an onnxruntime session's build, the statistics' activation batches, a layer's distance blocks) the
process's RSS stays at that stage's peak. Every stage that follows starts from there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["trim_heap"]


def trim_heap() -> None:
    """Give the memory freed since the last call back to the system, where the C library can (glibc).

    glibc's malloc raises its mmap threshold as large blocks are freed, so after a stage of large
    temporaries (the statistics' activation batches, a layer's distance blocks) numpy's later arrays come
    from the heap, and what they free stays in the process's RSS. On MiniLM the main process kept 220 MB
    of freed statistics batches while the workers started on the largest layers: the run's peak RSS.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once per process (each worker task ends with a trim); None for C
    libraries without it (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
