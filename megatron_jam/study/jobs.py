"""Run the project's tools as subprocesses: one log file each, wall times in ``timings.json``, a small pool.

Why subprocesses: the study must measure the tools a user runs (their flags, their
checkpoints, their JSON), and each tool owns its torch.distributed process group,
which one Python process cannot set up twice. Why a pool: on 2 CPU cores two
single-process jobs at once finish sooner than one job with 2 data-parallel
processes (no gradient all-reduce, half the start-up latency).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

from megatron_jam.utils.logging import get_logger

logger = get_logger("megatron_jam.study")


class StudyError(RuntimeError):
    """A tool failed: the message names the step, its log file and the log's last lines."""


class Runner:
    """Runs commands in the repository root with a clean distributed environment and records their wall times."""

    def __init__(self, repo: str, output: str, resume: bool = False) -> None:
        self.repo, self.output, self.resume = repo, output, resume
        self.log_dir = os.path.join(output, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.timings_path = os.path.join(output, "timings.json")
        self.timings: Dict[str, float] = {}
        if resume and os.path.exists(self.timings_path):
            with open(self.timings_path) as f:
                self.timings = json.load(f)
        self._lock = threading.Lock()

    def env(self) -> dict:
        """One thread per process (the pool shares the cores), no inherited rendezvous variables."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONWARNINGS"] = "ignore"
        env["PYTHONPATH"] = self.repo + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def run(self, step: str, cmd: Sequence[str], output: Optional[str] = None, retries: int = 1,
            before_retry: Optional[Callable[[], None]] = None) -> Optional[float]:
        """Run `cmd` (logged to ``logs/<step>.log``); returns and records its wall seconds; raises StudyError.

        A failed step is run again up to `retries` times (after `before_retry`, e.g. removing a partial
        output): on a machine shared with other work a tool can die for reasons of its own (a signal, a
        shared file being edited), and every step here can be repeated; the failed try's log is kept as
        ``<step>.failed<N>.log`` and the retry is logged. With `resume`, a step that succeeded before (it
        is in ``timings.json``, and its `output` exists if one is named) is not run again: a study stopped
        by a failure continues where it stopped."""
        if self.resume and step in self.timings and (output is None or os.path.exists(output)):
            logger.info("[%s] done before (%s), not run again", step, output or "timings.json")
            return self.timings[step]
        log = os.path.join(self.log_dir, step.replace("/", "_") + ".log")
        for attempt in range(retries + 1):
            seconds, rc = self._call(step, cmd, log)
            if rc == 0:
                self.record(step, seconds)
                logger.info("[%s] done in %.1f s", step, seconds)
                return seconds
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
            if attempt == retries:
                raise StudyError(f"step {step} failed (exit code {rc}; log {log}):\n{tail}")
            kept = log[:-len(".log")] + f".failed{attempt + 1}.log"
            os.replace(log, kept)
            logger.warning("[%s] failed (exit code %s; log %s), running it again", step, rc, kept)
            if before_retry:
                before_retry()
        return None

    def _call(self, step: str, cmd: Sequence[str], log: str) -> tuple:
        start = time.perf_counter()
        logger.info("[%s] %s", step, " ".join(cmd))
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.call(list(cmd), cwd=self.repo, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        return round(time.perf_counter() - start, 2), rc

    def record(self, key: str, seconds: float) -> None:
        """Store one wall time in ``timings.json`` (rewritten whole each time: always a complete file)."""
        with self._lock:
            self.timings[key] = seconds
            with open(self.timings_path, "w") as f:
                json.dump(self.timings, f, indent=1, sort_keys=True)


def run_parallel(tasks: List[Callable[[], None]], jobs: int) -> None:
    """Run independent task chains, `jobs` at a time; the first failure is raised after the others end."""
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            t()
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(t) for t in tasks]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
