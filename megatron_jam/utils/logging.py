"""Rank-aware logging for the library.

Megatron users expect one line per event, not one per rank: `get_logger` returns
a standard `logging.Logger` whose records carry the global rank, and
`log_rank0` emits only on rank 0. The library never calls `print`.
"""

import logging
import os
import sys

_FORMAT = "[%(asctime)s rank %(rank)s] %(levelname)s %(name)s: %(message)s"


def global_rank() -> int:
    """The torch.distributed rank if initialised, else RANK from the environment, else 0.

    torch.distributed is only asked when something imported it already (else it cannot be initialised):
    importing it here would cost a torch import (seconds) to tools that never use torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = global_rank()
        return True


def get_logger(name: str) -> logging.Logger:
    """A logger under the `megatron_jam` hierarchy, configured once, writing to stderr."""
    root = logging.getLogger("megatron_jam")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("MEGATRON_JAM_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("megatron_jam") else f"megatron_jam.{name}")


def log_rank0(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Log only on global rank 0 (the Megatron `print_rank_0` convention)."""
    if global_rank() == 0:
        logger.log(level, msg, *args)
