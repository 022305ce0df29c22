"""Decode steps with fixed shapes, so that a CUDA graph can replay them.

Why: the eager decode step (stepper.py) is a few hundred small kernels per token; for a small model on a
GPU its cost is the Python and the kernel launches, not the weights (docs/gpu.md: ~13 ms per token, the KV
cache gains 1.1x). A CUDA graph launches the whole step at once, but replays fixed shapes and fixed
addresses, and the eager step has neither: it attends over the slots so far (one more each step) and
writes the cache at a Python index. Here a decode step (one new slot per row) reads everything from
buffers allocated once per `generate` call:

    tokens, positions [b, 1]   the new slot of every row
    index [1]                  where the new slot goes in the KV cache (`KVCache.store` with a tensor)
    mask [b, 1, 1, capacity]   every slot: True (or -10000) where a slot is invalid; slots not yet
                               written are invalid, so the mask is also causal

and attends over the whole cache capacity. Masked keys add exactly zero weight, so the step computes
what the eager step computes (tests/test_static_decode.py: the same greedy ids, logits within 1e-5).
The prompt (prefill, many slots) runs eagerly once and allocates the cache; every later step goes here.

Modes (`--decode-step` of tools/generate_interleaved.py):

- `eager`: stepper.py's step (the default; the fastest on a CPU, where it attends over fewer slots);
- `static`: the fixed-shape step, run eagerly (what the graph holds; tested on CPU against `eager`);
- `cuda-graph`: captured once per `generate` call into a `torch.cuda.CUDAGraph`, then replayed (CUDA,
  tensor-parallel size 1).

Why not `torch.compile` (tried, docs/generation.md): dynamo breaks the graph inside Megatron-Core
(`warnings.warn` in `get_tensor_model_parallel_group_if_none`, the `.data` assignment of
`make_viewless_tensor`) and then guards every layer function on its module, recompiling per layer until
its recompile limit; on a CPU the compiled step was 12-33x slower than eager. A CUDA graph records the
kernels whatever Python launched them.
"""

import torch
from torch import Tensor

from megatron_jam.inference.kv_cache import KVCache, SlotTable

DECODE_STEPS = ("eager", "static", "cuda-graph")


def check_decode_step(mode: str, stepper) -> None:
    """One-line errors for a mode this process (and `stepper`'s model) cannot run, before any work."""
    from megatron.core import parallel_state

    device = stepper.device
    if mode not in DECODE_STEPS:
        raise ValueError(f"--decode-step {mode!r}: expected one of {', '.join(DECODE_STEPS)}")
    if mode != "cuda-graph":
        return
    if device.type != "cuda":
        raise ValueError("--decode-step cuda-graph needs the model on a CUDA device (eager or static on a CPU)")
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("--decode-step cuda-graph runs at tensor-model-parallel-size 1 only (the graph would hold "
                         "the tensor-parallel collectives; not checked yet); use --decode-step eager")
    if not stepper.additive_mask:  # Megatron's unfused attention reads its scores from a global buffer that a
        # later allocation may move; Transformer Engine's attention has not been captured here
        raise ValueError("--decode-step cuda-graph runs with PyTorch SDPA attention (--attention-backend auto, "
                         "flash or fused; --transformer-impl local); use --decode-step eager or static")


class StaticDecoder:
    """One `generate` call's decode steps over fixed-shape buffers (`mode`: static or cuda-graph)."""

    def __init__(self, stepper, slots: SlotTable, cache: KVCache, mode: str):
        dev, b, cap = stepper.device, slots.batch, slots.capacity
        self.stepper, self.cache, self.mode = stepper, cache, mode
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = stepper.attention_mask(torch.ones(b, 1, 1, cap, dtype=torch.bool, device=dev))
        self._graph, self._out = None, None

    @torch.no_grad()
    def step(self, slots: SlotTable, start: int) -> Tensor:
        """The eager `stepper.step(slots, cache, start, 1)`: logits `[b, V_padded]` of slot `start`, float32
        on the CPU."""
        if start != slots.length - 1:
            raise RuntimeError(f"a static step runs the newest slot ({slots.length - 1}), not slot {start}")
        self.tokens.copy_(slots.tokens[:, start:start + 1])
        self.positions.copy_(slots.positions[:, start:start + 1])
        self.index.fill_(start)
        self.mask.copy_(self.stepper.attention_mask(~slots.valid[:, None, None, :].to(self.mask.device)))
        if self.mode == "cuda-graph":
            return self._replay().float().cpu()
        return self._forward().float().cpu()

    def persistent_tensors(self) -> list[Tensor]:
        """What the step reads or writes in place, the same tensors every step: weights, KV cache, RoPE
        tables and the input buffers (tests/test_generation.py checks that nothing else carries over)."""
        model = self.stepper.model
        return (list(model.parameters()) + list(model.buffers()) + self.cache.tensors()
                + list(self.stepper.rope_tables()) + [self.tokens, self.positions, self.index, self.mask])

    def _forward(self) -> Tensor:
        """The step itself, reading only the buffers: logits `[b, V_padded]` on the model's device."""
        return self.stepper.forward(self.tokens, self.positions, self.cache, self.index, self.mask)

    def _replay(self) -> Tensor:
        """Capture on the first step (after a warm-up on a side stream, as PyTorch asks), replay on every step.
        The warm-up writes this step's keys and values, which the replay writes again: same slot, same values."""
        if self._graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self._forward()  # [b, V_padded], a buffer of the graph's pool
        self._graph.replay()
        return self._out
