"""One run per `--save` folder: `<save>/.lock`, held by global rank 0 for the whole run.

Why: two runs writing the same folder both exit 0, one run's checkpoints silently replace the other's
and `metrics.jsonl` interleaves both. The lock is an `fcntl.flock` on `<save>/.lock`, which the kernel
releases when the holder dies (kill -9, node crash of a local disk), so a stale lock never blocks a
resubmitted job; the file records who holds it (pid, host, start time) for the message the second run
prints, and a left-over record of a dead holder is reported when taken over. Every rank learns rank
0's outcome (a broadcast), so a refused run stops on all ranks instead of hanging in a collective.
"""

import fcntl
import json
import logging
import os
import socket
import time

import torch.distributed as dist

from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """Another run holds the `--save` folder (the message names it), or the lock cannot be taken."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"


def _read_holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


class RunLock:
    """`acquire()` on rank 0 (raises `RunLockError` naming the holder), `release()` at the end of the run."""

    def __init__(self, save: str):
        self.path = os.path.join(save, LOCK_FILE)
        self._file = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(f)
            f.close()
            raise RunLockError(f"--save {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}; "
                               f"lock {self.path}): wait for it to end or choose another --save") from None
        except OSError as e:  # a file system without locks (some Lustre / NFS mounts): run, but say so
            f.close()
            log_rank0(logger, "%s: cannot lock (%s): a second run on this --save would not be detected", self.path,
                      e, level=logging.WARNING)
            return
        previous = _read_holder(f)
        if previous:
            log_rank0(logger, "%s: taking over the lock of a run that ended without releasing it (%s)",
                      self.path, _describe(previous), level=logging.WARNING)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        f.flush()
        self._file = f

    def release(self) -> None:
        """Empty the record (a clean end leaves nothing to take over) and unlock."""
        if self._file is None:
            return
        self._file.truncate(0)
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def lock_run_dir(save: str) -> RunLock:
    """Take `<save>/.lock` on global rank 0; every rank raises `RunLockError` if rank 0 could not."""
    lock = RunLock(save)
    error = None
    if dist.get_rank() == 0:
        try:
            lock.acquire()
        except (RunLockError, OSError) as e:
            error = str(e) if isinstance(e, RunLockError) else f"--save {save}: cannot take the run lock ({e})"
    if dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise RunLockError(error)
    return lock
