"""Slot table and key/value cache for incremental decoding of both JAM model kinds.

Why our own cache instead of Megatron-Core's `StaticInferenceContext`: that
context keys its buffers by `layer_number`, and in JAM-Cross the parent layers
and the cross blocks of a stream share layer numbers (and the two streams
share them too), so four different attentions would write to one buffer.
Megatron-Core also treats a cross-attention's context as static (computed
once, as for an encoder); here the context is the *other stream*, which grows
by one position per generated token, so its keys and values must be appended
exactly like self-attention's. This module keys buffers by name
("llm.3", "img_cross.1", "decoder.0", ...) and appends both kinds the same way.

Every step appends the same number of *slots* to every batch row (the rows
move in lockstep). A slot holds one token; it is *valid* when the row really
has that token. Invalid slots are left padding of shorter prompts, steps of
rows that have finished, and the steps during which a classifier-free-guidance
row is idle. Attention never looks at an invalid slot (the mask below), so a
row computes exactly what it would compute alone, without padding.
"""

import torch
from torch import Tensor


class SlotTable:
    """Per-row bookkeeping: token, position and validity of every slot, `[b, capacity]`."""

    def __init__(self, batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.length = 0

    def add(self, tokens: Tensor, positions: Tensor, valid: Tensor) -> int:
        """Append `n` slots (`[b, n]` each); returns the index of the first new slot."""
        n = tokens.shape[1]
        start = self.length
        if start + n > self.capacity:
            raise RuntimeError(f"slot table full: {start} + {n} slots > capacity {self.capacity}")
        self.tokens[:, start:start + n] = tokens
        self.positions[:, start:start + n] = torch.where(valid, positions, torch.zeros_like(positions))
        self.valid[:, start:start + n] = valid
        self.length = start + n
        return start

    def invalidate(self, row: int, start: int, end: int) -> None:
        """Slots [start, end) of `row` are never attended again (a CFG row starting over)."""
        self.valid[row, start:end] = False

    def attention_mask(self, start: int, n: int) -> Tensor:
        """Mask of the queries in slots [start, start+n) over keys [0, start+n): `[b, 1, n, start+n]`.

        True = masked (Megatron's convention): invalid keys and keys after the query (causal).
        """
        keys = start + n
        causal = torch.arange(keys)[None, :] > torch.arange(start, keys)[:, None]  # [n, keys]
        return (causal[None] | ~self.valid[:, None, :keys]).unsqueeze(1)


class KVCache:
    """Keys and values per attention, in static buffers `[capacity, b, groups, head_dim]`.

    Preallocated so that a step writes one slot in place instead of concatenating
    the whole prefix again (which would make the step cost grow with the length).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buffers: dict[str, tuple[Tensor, Tensor]] = {}

    def store(self, name: str, start: int | Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write `[n, b, g, hn]` keys/values at slots [start, start+n); return slots [0, start+n).

        `start` a device tensor `[n]` of slot indices instead (static_decode.py): the write is an
        `index_copy_` and the whole buffers are returned, so every step has the same shapes and no Python
        number reaches the kernels (what a CUDA graph replays)."""
        if name not in self._buffers:
            if isinstance(start, Tensor):
                raise RuntimeError(f"KV cache {name!r} has no buffer yet: run the prompt before a static step")
            shape = (self.capacity,) + tuple(key.shape[1:])
            self._buffers[name] = (key.new_zeros(shape), value.new_zeros(shape))
        kbuf, vbuf = self._buffers[name]
        if isinstance(start, Tensor):
            kbuf.index_copy_(0, start, key)
            vbuf.index_copy_(0, start, value)
            return kbuf, vbuf
        end = start + key.shape[0]
        kbuf[start:end] = key
        vbuf[start:end] = value
        return kbuf[:end], vbuf[:end]

    def tensors(self) -> list[Tensor]:
        """Every key and value buffer (what a CUDA graph of a decode step reads and writes in place)."""
        return [t for kv in self._buffers.values() for t in kv]

    def names(self) -> list[str]:
        return sorted(self._buffers)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self._buffers.values())
