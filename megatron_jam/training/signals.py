"""SIGTERM (Slurm pre-emption) as a distributed flag: checkpoint and exit cleanly.

Why a flag and not an exit in the handler: the signal reaches ranks at
different moments, and a checkpoint is a collective. The handler only records
the signal; the loop asks `received()` once per iteration, which ORs the flag
over all ranks, so every rank saves and leaves at the same iteration.
"""

import signal

from megatron_jam.training.metrics import any_rank_true


class SigtermFlag:
    def __init__(self, sig: int = signal.SIGTERM):
        self._got = False
        self._sig = sig
        self._previous = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._got = True

    def received(self) -> bool:
        """True on every rank once any rank got the signal (a collective: call on all ranks)."""
        return any_rank_true(self._got)

    def restore(self) -> None:
        signal.signal(self._sig, self._previous)
