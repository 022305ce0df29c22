"""Progress that suits where it goes: a tqdm bar on a terminal, periodic log lines otherwise.

Why: a bar redraws itself with carriage returns, which a terminal shows as one moving line but a log file
(Slurm's output, `2> run.log`) keeps as thousands of `\\r` fragments. Off a terminal the same updates
become a log line every tenth of the total (or every `seconds` when the total is unknown), plus one at the
end. Every tool that shows progress goes through `progress`.
"""

import sys
import time

from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)


class LogProgress:
    """The tqdm calls the tools use (`update`, `set_postfix_str`, `close`, `with`), written as log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, seconds: float, lines: bool) -> None:
        self.total, self.desc, self.unit, self.seconds, self.lines = total, desc, unit, seconds, lines
        self.n, self.postfix, self.start = 0, "", time.monotonic()
        self.last_log, self.next_fraction, self.logged_n = self.start, 0.1, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total:
            due = self.n / self.total >= self.next_fraction and self.n < self.total
        else:
            due = now - self.last_log >= self.seconds
        if due:
            self._log(now)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.lines and self.n != self.logged_n:
            self._log(time.monotonic())
        self.lines = False

    def _log(self, now: float) -> None:
        if self.total:
            self.next_fraction = (int(self.n / self.total * 10) + 1) / 10
        self.last_log, self.logged_n = now, self.n
        if not self.lines:
            return
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %d%s %s, %.1f %s/s%s", self.desc, self.n, of, self.unit, rate, self.unit, extra)


def progress(total: int | None = None, desc: str = "progress", unit: str = "it", enabled: bool = True,
             seconds: float = 30.0, log_lines: bool = True, leave: bool = True):
    """A tqdm bar when `enabled` and stderr is a terminal; otherwise a `LogProgress` (log lines only if
    `enabled` and `log_lines`: a tool that logs its own periodic lines, or an inner bar, passes False)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave)
    return LogProgress(total, desc, unit, seconds, enabled and log_lines)
