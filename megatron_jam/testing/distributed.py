"""A persistent pool of gloo worker processes for multi-rank tests and benchmarks.

Why: starting a process that imports torch and Megatron-Core costs seconds,
and a test suite runs dozens of multi-rank bodies. `WorkerPool(world_size)`
starts its ranks once (spawn, gloo over loopback) and then runs any number of
module-level functions on all ranks, each call in a fresh Megatron
parallel-state. Failures come back from every rank at once: the raised
`DistributedTestError` carries each failing rank's traceback, and a rank that
hangs (a collective mismatch) is reported by a timeout naming the ranks that
did not answer, after which the pool is torn down.

Usage::

    pool = WorkerPool(2)
    results = pool.run(my_module.body, tp=2, pp=1)   # one result per rank
    pool.close()
"""

import atexit
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

_POLL_S = 0.2


class DistributedTestError(AssertionError):
    """One or more ranks failed; the message holds every failing rank's traceback."""


def _free_port() -> int:
    from megatron_jam.parallel.initialize import free_port

    return free_port()


def _reset_parallel_state() -> None:
    from megatron_jam.parallel.initialize import destroy_model_parallel

    destroy_model_parallel()


def _worker_main(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    import megatron_jam  # noqa: F401  (installs the CPU layer)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            out = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            out = ("error", traceback.format_exc())
        finally:
            _reset_parallel_state()
        results.put((rank, *out))
    dist.destroy_process_group()


def _kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process it started. A killed worker cannot shut down what it owns, and
    Megatron-Core's checkpoint writer keeps one `multiprocessing.Manager` server per process (a child that
    waits for a shutdown message forever): killing only the worker would leave that server running."""
    import psutil

    try:
        proc = psutil.Process(pid)
        descendants = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in descendants + [proc]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_dead(descendants + [proc])


def _wait_dead(procs: list, timeout_s: float = 10.0) -> None:
    """Until every process in `procs` is gone or a zombie (an orphan is reaped by init, if ever)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs):
                return
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.05)


class WorkerPool:
    """`world_size` gloo ranks kept alive between calls of `run`."""

    def __init__(self, world_size: int, start_timeout_s: float = 180.0, error_grace_s: float = 10.0):
        self.world_size = world_size
        self.start_timeout_s = start_timeout_s
        self.error_grace_s = error_grace_s
        self._start()

    def _start(self) -> None:
        world_size = self.world_size
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(target=_worker_main, args=(r, world_size, port, self._tasks[r], self._results),
                        # not daemonic: dist_checkpointing's writer starts processes of its own
                        daemon=False, name=f"jam-rank{r}")
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        atexit.register(self.close, force=True)
        self._collect(self.start_timeout_s, what="start-up")

    def run(self, fn: Callable, *args, timeout_s: float = 300.0, **kwargs) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the per-rank results in rank order.

        A pool torn down by an earlier failure is restarted first.
        """
        if self._procs is None:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(timeout_s, what=getattr(fn, "__qualname__", str(fn)))

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        import queue
        import time

        got: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=_POLL_S)
                got[rank] = (status, payload)
                if status == "error":  # the others may be stuck in a collective with it
                    deadline = min(deadline, time.monotonic() + self.error_grace_s)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self._fail(what, got, dead)
        errors = {r: p for r, (s, p) in got.items() if s == "error"}
        if errors:
            body = "\n".join(f"----- rank {r} -----\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedTestError(f"{what} failed on ranks {sorted(errors)}:\n{body}")
        return [got[r][1] for r in range(self.world_size)]

    def _fail(self, what: str, got: dict, dead: list[str]) -> None:
        missing = [r for r in range(self.world_size) if r not in got]
        errors = "\n".join(f"----- rank {r} -----\n{p}" for r, (s, p) in sorted(got.items()) if s == "error")
        self.close(force=True)
        reason = f"processes died: {dead}" if dead else "timed out (or stuck after another rank failed)"
        raise DistributedTestError(f"{what}: {reason}; ranks {missing} did not answer.\n{errors}")

    def close(self, force: bool = False) -> None:
        if self._procs is None:
            return
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                _kill_tree(p.pid)
        self._procs = None
