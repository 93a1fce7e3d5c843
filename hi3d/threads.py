"""How many CPU threads a stage uses: what the machine actually has free, re-checked as the stage runs.

Policy (every CPU stage: 3DGS fit, NeuS fit, SDF grid, texture bake, degradation, rendering):
- ``num_threads > 0`` (a config's explicit setting) wins and is kept for the whole stage.
- ``num_threads = 0`` (auto): the CPUs this process may run on (``os.sched_getaffinity``) minus the cores
  other processes keep busy, at least 1 and at most torch's setting (``OMP_NUM_THREADS`` or the core count).
  "Busy" is measured, not guessed: the CPU time of the affinity CPUs in ``/proc/stat`` over a short window,
  less this process's own CPU time in it (``os.times``); without ``/proc/stat`` (macOS), the 1-minute load
  average less this process's threads. ``CpuThreads.update()`` re-measures every ``interval`` seconds
  inside a stage's loop, so a process that starts (or ends) beside a long fit changes the count within
  seconds. Headless rendering (Mesa llvmpipe) sizes its pool once per process, when the first EGL
context is made: ``LP_NUM_THREADS`` if set, else the auto count then.

Why: torch's parallel regions are fine-grained (one per op). With two threads on two cores and one core
taken, every op waits for the descheduled thread: measured here, 3DGS 20x and NeuS 10x slower per step. One
thread on the free core keeps the idle speed; two threads on an idle 2-core machine are ~1.5x faster.

Denormal floats: every CPU stage runs with denormals flushed to zero (FTZ/DAZ) on all of torch's threads
(``flush_denormals``). NeuS's softplus (beta 100) far from the surface, its gradients and Adam's second
moments of the hash table fall into the denormal range, where x86 arithmetic takes a slow microcode path:
measured on trained NeuS models at one thread, Wuson 0.93 -> 0.36 s and the bunny 0.47 -> 0.36 s a step.
``torch.set_flush_denormal`` sets only the calling thread; OpenMP's worker threads keep their own state, so
the main thread's floating-point environment is copied to every thread of the pool (``GOMP_parallel`` of
the OpenMP runtime torch loaded, Linux) and restored on exit. Elsewhere only the calling thread flushes.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import sys
import time
from collections.abc import Iterator

import torch

_THREAD_LOG: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("hi3d_cpu_threads", default=None)


@contextlib.contextmanager
def record_cpu_threads() -> Iterator[list[dict]]:
    """Collects one entry per thread context (``cpu_threads``) that ends inside the block: ``requested``
    (0 = auto), ``threads`` (``[seconds since its start, count]`` changes) and ``denormals_flushed`` (on all
    threads). Results are bit-reproducible for a given seed and thread history; ``RunRecord.stage`` writes it."""
    log: list[dict] = []
    token = _THREAD_LOG.set(log)
    try:
        yield log
    finally:
        _THREAD_LOG.reset(token)


_FENV_BYTES = 512  # >= sizeof(fenv_t) on every glibc target


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's thread pool lives in (found in this process's memory map), or None."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libomp", "libiomp5")):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GOMP_parallel"):
                lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                lib.GOMP_parallel.restype = None
                return lib
    return None


def _set_env_on_every_thread(env: ctypes.Array, team: int) -> bool:
    """``fesetenv(env)`` on the first ``team`` threads of torch's OpenMP pool (the caller is thread 0); False
    where not possible."""
    omp = _openmp_runtime()
    if omp is None:
        return False
    libc = ctypes.CDLL(None)
    omp.GOMP_parallel(ctypes.cast(libc.fesetenv, ctypes.c_void_p), ctypes.cast(env, ctypes.c_void_p),
                      team, 0)
    return True


def _main_thread_flushes() -> bool:
    return (torch.tensor([1e-30]) * torch.tensor([1e-9])).item() == 0.0  # 1e-39 is a denormal float32


@contextlib.contextmanager
def flush_denormals(team: int | None = None) -> Iterator[bool]:
    """Denormal float32/64 results and inputs read as zero on torch's CPU threads inside the block (threads the
    pool starts inside it inherit the setting); the previous floating-point environment is restored on exit.
    ``team``: the most threads the block will use (default torch's current count). Yields whether the pool's
    threads were reached (False: only this thread, e.g. no OpenMP runtime found or not Linux)."""
    team = max(team or 1, torch.get_num_threads())
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        before = ctypes.create_string_buffer(_FENV_BYTES)
        if libc.fegetenv(before) == 0 and torch.set_flush_denormal(True):
            flushing = ctypes.create_string_buffer(_FENV_BYTES)
            libc.fegetenv(flushing)
            every = _set_env_on_every_thread(flushing, team)
            try:
                yield every
            finally:
                if not _set_env_on_every_thread(before, max(team, torch.get_num_threads())):
                    libc.fesetenv(before)
            return
    was = _main_thread_flushes()
    torch.set_flush_denormal(True)
    try:
        yield False
    finally:
        torch.set_flush_denormal(was)


def affinity_cpus() -> list[int]:
    """CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_jiffies(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) CPU time in clock ticks, summed over ``cpus`` (``/proc/stat``), or None without it."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want, busy, total = {f"cpu{c}" for c in cpus}, 0.0, 0.0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            v = [float(x) for x in parts[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
            t = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
            busy, total = busy + t - idle, total + t
    return (busy, total) if total > 0 else None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def threads_for(cpus: int, others_busy: float, cap: int) -> int:
    """Auto thread count: the ``cpus`` less the cores others keep busy, in [1, cap]; a core at least 70% taken
    by others counts as taken (a thread there would stall every parallel region)."""
    return max(1, min(cap, int(cpus - others_busy + 0.3)))


class CpuThreads:
    """Context manager setting torch's CPU thread count by the policy above; restores it on exit.

    ``requested > 0``: that many, fixed. ``0``: auto, re-measured by ``update()`` every ``interval`` s, at most
    ``max_threads`` (default torch's current setting).
    ``threads`` is the current count; ``history`` lists ``(seconds since start, threads)`` changes.
    """

    def __init__(self, requested: int = 0, interval: float = 5.0, probe: float = 0.1, max_threads: int | None = None):
        if requested < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = auto), got {requested}")
        self.requested, self.interval, self.probe = requested, interval, probe
        self.cpus = affinity_cpus()
        self.cap = max(1, min(torch.get_num_threads() if max_threads is None else max_threads, len(self.cpus)))
        self.threads = requested or self.cap
        self.history: list[tuple[float, int]] = []
        self._mark = None

    def __enter__(self) -> CpuThreads:
        self._before = torch.get_num_threads()
        self._flush = flush_denormals(max(self.cap, self.requested))
        self.all_threads_flush = self._flush.__enter__()
        self._start = time.monotonic()
        if self.requested:
            self._set(self.requested)
        else:
            self._mark = self._sample()
            time.sleep(self.probe)  # a first window: nothing of ours runs in it
            self._set(self._choose())
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._before)
        self._flush.__exit__(*exc)
        log = _THREAD_LOG.get()
        if log is not None:
            log.append({"requested": self.requested, "threads": [list(h) for h in self.history],
                        "denormals_flushed": self.all_threads_flush})

    def update(self) -> int:
        """Re-measure (auto only, at most every ``interval`` s; cheap otherwise); returns the thread count."""
        if not self.requested and time.monotonic() - self._mark[0] >= self.interval:
            self._set(self._choose())
        return self.threads

    def _sample(self):
        return time.monotonic(), _cpu_jiffies(self.cpus), _own_cpu_seconds()

    def others_busy(self) -> float:
        """Cores other processes kept busy since the last measurement (>= 0), and a new window starts."""
        now = self._sample()
        (t0, j0, own0), (t1, j1, own1) = self._mark, now
        self._mark = now
        if j0 is not None and j1 is not None and j1[1] > j0[1]:
            busy_cores = (j1[0] - j0[0]) / (j1[1] - j0[1]) * len(self.cpus)
            return max(busy_cores - (own1 - own0) / max(t1 - t0, 1e-6), 0.0)
        try:
            return max(os.getloadavg()[0] - self.threads, 0.0)
        except OSError:
            return 0.0

    def _choose(self) -> int:
        return threads_for(len(self.cpus), self.others_busy(), self.cap)

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        if not self.history or self.history[-1][1] != n:
            self.history.append((round(time.monotonic() - self._start, 2), n))
        self.threads = n


def free_cpus(probe: float = 0.1) -> int:
    """The auto thread count now, measured once (for pools fixed at start-up, e.g. Mesa llvmpipe's)."""
    with CpuThreads(0, probe=probe) as threads:
        return threads.threads


def cpu_threads(requested: int = 0, **kwargs) -> CpuThreads:
    """``with cpu_threads(cfg.num_threads) as threads: ... threads.update()`` (see the module docstring)."""
    return CpuThreads(requested, **kwargs)
