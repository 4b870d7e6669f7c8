"""Where a serving process runs its torch work: one long-lived thread for all of it.

    compute = ComputeThread()                    # or InlineCompute(): on the trio thread
    engine = await compute.run(Engine, config)   # build, step and embed on the same thread
    deltas = await compute.run(engine.step)

Why one thread. torch on CPU parallelizes with OpenMP (libgomp), which keeps a pool of
helper threads per thread that has run a parallel region, for as long as that thread lives.
Once the process holds more OpenMP threads than CPUs — two pools on a 2-core machine: say
the engine built on one thread and stepped on another, or the trio thread ran one matmul —
libgomp stops spinning between parallel regions (its "throttled" spin count) and every
region pays a futex sleep and wake-up in each helper. Measured on a 2-core AMX Xeon, bf16,
30 sequences decoding (`docs/scheduling.md`, "One thread for torch"): 47.5-48.7 ms a step on
a dedicated thread alone; 70.4 ms on that same thread after the main thread had run one
matmul; 70.1 ms on the main thread then. A thread that ran torch and exited left no trace
(50.3 ms): its pool goes with it. trio's worker threads are cached and come and go, so
`trio.to_thread` for steps and embeddings kept two or three pools alive: through the
runtime the engine's steps took 1.5-1.7x what they took in `ops.bench_sched`'s loop.

`ComputeThread.run` always completes the call, even if the awaiting task is cancelled
(as `trio.to_thread.run_sync` without `abandon_on_cancel`): an engine step cut off halfway
would leave the engine's state torn.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class InlineCompute:
    """Runs each call on the calling (trio) thread, blocking the event loop: for a runtime
    that steps the engine on the trio thread (`step_in_thread=False`), so that thread stays
    the process's only torch thread."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    def close(self) -> None:
        pass


class ComputeThread:
    """One daemon thread that runs, in order, every call handed to `run` (see the module
    docstring). Calls from the thread itself run inline (no deadlock)."""

    def __init__(self, name: str = "lmgate-compute") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))

    @property
    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the compute thread; the result (or exception) comes back here."""
        if self.on_thread:
            return fn(*args)
        self._ensure_started()
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[outcome.Outcome](1)

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(send.send_nowait, result)
            except trio.RunFinishedError:  # the trio run ended while the call ran: nobody to tell
                pass

        self._jobs.put((fn, args, deliver))
        with trio.CancelScope(shield=True):  # the call runs to its end either way: wait for it
            result = await recv.receive()
        return result.unwrap()

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the compute thread, from a thread that is not running trio."""
        if self.on_thread:
            return fn(*args)
        self._ensure_started()
        done = threading.Event()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            box.append(result)
            done.set()

        self._jobs.put((fn, args, deliver))
        done.wait()
        return box[0].unwrap()

    def close(self) -> None:
        """Stop the thread after the calls already handed over (its OpenMP pool goes with it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP thread pool, if libgomp is loaded (`omp_pause_resource_all`,
    OpenMP 5.0): for a process that ran torch on this thread and is about to hand its torch work
    to a `ComputeThread` (a benchmark that also drives the engine from its main thread). The
    pool comes back the next time this thread runs a parallel region. False if there is no
    libgomp or the call failed."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and line.split()[-1].startswith("/")}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            pause = lib.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        return pause(1) == 0  # omp_pause_soft
    return False
