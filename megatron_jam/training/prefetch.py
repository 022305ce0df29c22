"""Micro-batches off the critical path: background workers build the next steps' batches (`--num-workers`).

Why: a training step's micro-batches come from the dataset (memory-mapped documents, the CM3 transform,
retrieval), built on the step's own thread they delay every step by that time. Megatron-LM hands them to a
`DataLoader` with `--num-workers` processes; so do we, over one item per training step (this data-parallel
rank's micro-batches of that step), so that the data position stays what it is without workers: step k of a
run that starts at `consumed` samples reads the samples `consumed + k * global_batch_size + ...` exactly as
`loop._batches` does, and a resumed run continues where the checkpoint says (the bit-identical resume tests
run with workers too). On a GPU the batches are pinned for asynchronous copies.
"""

from typing import Callable, Iterator

import torch


class _StepBatches(torch.utils.data.Dataset):
    """Item k: the micro-batches of the k-th step from `start` consumed samples (`make(consumed)`)."""

    def __init__(self, make: Callable[[int], list], start: int, global_batch_size: int, steps: int):
        self.make, self.start, self.global_batch_size, self.steps = make, start, global_batch_size, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> list:
        return self.make(self.start + k * self.global_batch_size)


class BatchPrefetcher:
    """`next(consumed)` returns the step's micro-batches; with workers they were built ahead, in order."""

    def __init__(self, make: Callable[[int], list], start: int, global_batch_size: int, steps: int,
                 num_workers: int = 0, prefetch_factor: int = 2):
        self.make, self.expected, self.global_batch_size = make, start, global_batch_size
        self._it: Iterator | None = None
        if num_workers > 0 and steps > 0:
            loader = torch.utils.data.DataLoader(
                _StepBatches(make, start, global_batch_size, steps), batch_size=None, shuffle=False,
                num_workers=num_workers, prefetch_factor=prefetch_factor, pin_memory=torch.cuda.is_available(),
                persistent_workers=False)
            self._it = iter(loader)

    def next(self, consumed: int) -> list:
        """The micro-batches of the step that starts at `consumed` samples (must be the next step in order)."""
        if self._it is None:
            return self.make(consumed)
        if consumed != self.expected:
            raise RuntimeError(f"prefetched data is for {self.expected} consumed samples, the step is at {consumed}")
        self.expected += self.global_batch_size
        return next(self._it)

    def close(self) -> None:
        """Stop the workers (a run that ends early: SIGTERM, too many skipped steps)."""
        self._it = None
