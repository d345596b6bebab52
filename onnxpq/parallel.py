"""Run independent per-layer tasks serially, in local processes, or on a Ray cluster.

Quantizing one weight and searching one channel group's permutation each depend
only on that layer's arrays, a seed derived from its name, and the config: they
are embarrassingly parallel, and any schedule gives the same bytes as the serial
run. Each task ships its own arrays (a layer's weight and statistics), never the
model, and at most a few tasks are in flight at once, so memory stays at a few
layers however large the model is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import get_context
from typing import Any, TypeVar

from tqdm.auto import tqdm

from onnxpq.errors import ConfigError
from onnxpq.heap import trim_heap

__all__ = ["Workers", "available_memory", "map_tasks", "usable_cores"]

T = TypeVar("T")

#: Tasks in flight per worker: enough to keep workers busy, few enough to bound the arrays in transit.
IN_FLIGHT_PER_WORKER = 2
#: Environment variables that size the BLAS/OpenMP pools of worker processes.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: With ``jobs=None`` ("auto"), models with fewer compressible weights run in one process: starting
#: spawned workers costs about a second each, more than a small model's whole quantization.
PARALLEL_FROM_WEIGHTS = 1 << 20
#: What a worker process holds before its first task: the interpreter with numpy, scipy, onnx and onnxruntime.
WORKER_BASE_BYTES = 300 << 20
#: Assumed free memory where the platform does not report it.
FALLBACK_AVAILABLE_BYTES = 4 << 30


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or a fallback."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_AVAILABLE_BYTES


def _trimmed(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker, which then returns the memory the task freed (``trim_heap``)."""
    try:
        return fn(*args)
    finally:
        trim_heap()


@dataclass(frozen=True)
class Workers:
    """Where per-layer tasks run; never changes the output bytes, so it is not part of ``CompressConfig``.

    Parameters
    ----------
    jobs : local worker processes; 1 runs every task in this process; None ("auto", the default)
        decides per run (``resolved``): one per usable core on models large enough to repay
        starting them, as many as the available memory holds.
    ray_address : a Ray cluster to run the tasks on ("auto", "ray://host:10001", or "local" to
        start a single-machine cluster here); needs the ``distributed`` extra. Overrides ``jobs``.
    """

    jobs: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs {self.jobs} must be >= 1")

    def resolved(self, weights: int, task_bytes: int) -> Workers:
        """These workers with ``jobs`` decided, for tasks over ``weights`` compressible weights that each
        hold at most ``task_bytes`` of arrays; an explicit ``jobs`` is kept as given."""
        if self.jobs is not None or self.ray_address is not None:
            return self
        if weights < PARALLEL_FROM_WEIGHTS:
            return replace(self, jobs=1)
        fits = available_memory() // (WORKER_BASE_BYTES + IN_FLIGHT_PER_WORKER * task_bytes)
        return replace(self, jobs=int(max(1, min(usable_cores(), fits))))


def map_tasks(
    fn: Callable[..., T],
    tasks: Iterable[tuple[Any, ...]],
    workers: Workers,
    *,
    total: int,
    desc: str,
    progress: bool = False,
    then: Callable[[T], Any] | None = None,
) -> list[Any]:
    """``[then(fn(*args)) for args in tasks]``, in order, run where ``workers`` says.

    ``tasks`` may be a generator: each task's arrays are read only when it is submitted. ``then`` runs here,
    on each result as it arrives, so what a result becomes (moved to disk, say) is all that is ever held of it.
    """
    keep = then or _same
    bar = tqdm(total=total, desc=desc, unit="layer", disable=not progress, leave=False)
    with bar:
        if workers.ray_address is not None:
            return _on_ray(fn, tasks, workers.ray_address, bar, keep)
        if (workers.jobs or 1) > 1 and total > 1:
            return _in_processes(fn, tasks, min(workers.jobs, total), bar, keep)
        results = []
        for args in tasks:
            results.append(keep(fn(*args)))
            bar.update()
        return results


def _same(result: T) -> T:
    return result


@contextlib.contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    """Workers inherit the environment when they start: give each its share of the cores, not all of them."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _in_processes(
    fn: Callable[..., T], tasks: Iterable[tuple[Any, ...]], jobs: int, bar: tqdm, keep: Callable[[T], Any]
) -> list[Any]:
    # spawn, not fork: the parent may hold onnxruntime or torch thread pools that fork would copy half-alive.
    threads = max(1, usable_cores() // jobs)
    with _thread_limit(threads), ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:

        def first_done(pending: Iterable[Future]) -> list[tuple[Future, Any]]:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            return [(future, future.result()) for future in done]

        return _bounded(partial(pool.submit, _trimmed, fn), first_done, tasks, jobs * IN_FLIGHT_PER_WORKER, bar, keep)


def _bounded(
    submit: Callable[..., Any],
    first_done: Callable[[Iterable[Any]], list[tuple[Any, Any]]],
    tasks: Iterable[tuple[Any, ...]],
    limit: int,
    bar: tqdm,
    keep: Callable[[Any], Any],
) -> list[Any]:
    """Submit tasks with at most ``limit`` in flight and return ``keep`` of their results in task order.

    ``submit(*args)`` starts one task and returns a handle; ``first_done(handles)`` blocks until some finish and
    returns (handle, result) pairs: the one loop both the process pool and Ray run.
    """
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}

    def collect() -> None:
        for handle, value in first_done(list(pending)):
            results[pending.pop(handle)] = keep(value)
            bar.update()

    for index, args in enumerate(tasks):
        if len(pending) >= limit:
            collect()
        pending[submit(*args)] = index
    while pending:
        collect()
    return [results[i] for i in range(len(results))]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray-address needs Ray: pip install 'onnxpq[distributed]'") from None
    return ray


@contextlib.contextmanager
def _ray_session(address: str) -> Iterator[Any]:
    """Connect to (or start, for "local") a Ray cluster; disconnect afterwards only if we connected."""
    ray = _ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def _on_ray(
    fn: Callable[..., T], tasks: Iterable[tuple[Any, ...]], address: str, bar: tqdm, keep: Callable[[T], Any]
) -> list[Any]:
    with _ray_session(address) as ray:
        remote = ray.remote(num_cpus=1)(fn)
        limit = max(1, int(ray.cluster_resources().get("CPU", 1))) * IN_FLIGHT_PER_WORKER

        def first_done(pending: Iterable[Any]) -> list[tuple[Any, Any]]:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            return [(ref, ray.get(ref))]

        return _bounded(remote.remote, first_done, tasks, limit, bar, keep)
