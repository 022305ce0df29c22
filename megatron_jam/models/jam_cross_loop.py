"""The one JAM-Cross layer loop: training forward, incremental decoding and activation recomputation share it.

Why one place: JAM-Cross cannot use `TransformerBlock.forward` (two stacks advance together and exchange
states through the cross blocks), so the order of eq. 4 -- before every k-th parent layer l, both cross
blocks read the states *entering* layer l, then both parent layers run -- is ours to keep. This module owns
that order, the slot map (from `JamCrossConfig.cross_layer_indices`), the contexts `TransformerBlock.forward`
wraps its layers in (the model-parallel RNG under sequence parallelism; FP8 and FP4 quantization contexts)
and Megatron-LM's full activation recomputation (`--recompute-granularity full`, `--recompute-method
uniform|block`, `--recompute-num-layers`) through Megatron-Core's `tensor_parallel.checkpoint`. What a step
does to one layer is the caller's: `JamCrossModel.forward_streams` calls the layers, the decoder
(`inference/stepper.py`) runs them over new slots with a KV cache. Selective recomputation (core attention)
needs nothing here: Megatron-Core's attention does it when the config asks.

A recomputation unit is a whole step: the cross pair (if layer l has one) and layer l of both streams, so
`--recompute-num-layers N` counts parent layers as it does for a GPT.
"""

import contextlib
from typing import Callable

from torch import Tensor
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp4_utils import get_fp4_context
from megatron.core.fp8_utils import get_fp8_context

ParentStep = Callable[[str, int, object, Tensor], Tensor]
"""(stream 'llm' | 'img', local layer index, TransformerLayer, h [s(/tp), b, d]) -> h after the layer."""
CrossStep = Callable[[str, int, object, Tensor, Tensor], Tensor]
"""(stream, local cross index, cross TransformerLayer, h, context: the other stream's h) -> h after the block."""


def cross_slots(cfg, llm_layers, cross_layers) -> dict[int, int]:
    """Local parent-layer index -> local cross-block index on this pipeline stage, from the config's
    `cross_layer_indices` (global layers whose input feeds a cross pair) and the layers' global numbers."""
    pairs = {g: j for j, g in enumerate(cfg.cross_layer_indices())}  # global layer -> global cross pair
    first = cross_layers[0].layer_number - 1 if len(cross_layers) else 0
    slots = {i: pairs[layer.layer_number - 1] - first for i, layer in enumerate(llm_layers)
             if layer.layer_number - 1 in pairs}
    if sorted(slots.values()) != list(range(len(cross_layers))):
        raise RuntimeError(f"cross blocks {sorted(slots.values())} on this stage do not match its "
                           f"{len(cross_layers)} cross layers (cross_every={cfg.cross_every})")
    return slots


class CrossLayerLoop:
    """Walks the layers of one `JamCrossModel` stage (`model.llm`, `model.img`, and their cross blocks)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.slots = cross_slots(model.cfg, model.llm.layers, model.llm_cross.layers)

    def run(self, h_llm: Tensor, h_img: Tensor, parent: ParentStep, cross: CrossStep,
            recompute: bool = False) -> tuple[Tensor, Tensor]:
        """Both streams through every layer of the stage; `[s(/tp), b, d]` in and out. `recompute`: full
        activation recomputation per the config (the training forward; never the decoder)."""
        with self._outer_contexts():
            if recompute and self.config.recompute_granularity == "full":
                return self._checkpointed(h_llm, h_img, parent, cross)
            return self._steps(0, len(self.model.llm.layers), parent, cross)(h_llm, h_img)

    def _steps(self, start: int, end: int, parent: ParentStep, cross: CrossStep):
        """A function running layers [start, end) of both streams (with their cross pairs) on (h_llm, h_img)."""
        m = self.model

        def run_steps(h_llm: Tensor, h_img: Tensor) -> tuple[Tensor, Tensor]:
            for i in range(start, end):
                if i in self.slots:
                    j = self.slots[i]
                    x_llm, x_img = m.llm_cross.layers[j], m.img_cross.layers[j]
                    # Eq. 4, both directions from the states entering layer l: [s(/tp), b, d] each.
                    with self._layer_context(x_llm):
                        new_llm = cross("llm", j, x_llm, h_llm, h_img)
                    with self._layer_context(x_img):
                        h_img = cross("img", j, x_img, h_img, h_llm)
                    h_llm = new_llm
                with self._layer_context(m.llm.layers[i]):
                    h_llm = parent("llm", i, m.llm.layers[i], h_llm)
                with self._layer_context(m.img.layers[i]):
                    h_img = parent("img", i, m.img.layers[i], h_img)
            return h_llm, h_img
        return run_steps

    def _checkpointed(self, h_llm: Tensor, h_img: Tensor, parent: ParentStep, cross: CrossStep):
        """Megatron-LM's full recomputation over steps: `uniform` checkpoints every chunk of
        `recompute_num_layers` steps, `block` the first `recompute_num_layers` steps of the stage only."""
        n, k, cfg = len(self.model.llm.layers), self.config.recompute_num_layers, self.config
        if cfg.recompute_method == "uniform":
            for start in range(0, n, k):
                h_llm, h_img = self._checkpoint(self._steps(start, min(start + k, n), parent, cross), h_llm, h_img)
            return h_llm, h_img
        if cfg.recompute_method == "block":
            for i in range(n):
                step = self._steps(i, i + 1, parent, cross)
                h_llm, h_img = self._checkpoint(step, h_llm, h_img) if i < k else step(h_llm, h_img)
            return h_llm, h_img
        raise ValueError(f"recompute_method={cfg.recompute_method!r}: expected 'uniform' or 'block'")

    def _checkpoint(self, fn, h_llm: Tensor, h_img: Tensor) -> tuple[Tensor, Tensor]:
        """`fn(h_llm, h_img)` without keeping its activations; Transformer Engine's checkpoint under FP8/FP4
        (as `TransformerBlock`), Megatron-Core's otherwise (both restore the RNG states for the rerun)."""
        if self.config.fp8 or self.config.fp4:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(fn, self.config.distribute_saved_activations,
                                 tensor_parallel.random.get_cuda_rng_tracker,
                                 parallel_state.get_tensor_model_parallel_group(),
                                 h_llm, h_img)
        return tensor_parallel.checkpoint(fn, self.config.distribute_saved_activations, h_llm, h_img)

    def _outer_contexts(self):
        """What `TransformerBlock.forward` wraps its layers in: the model-parallel RNG under sequence
        parallelism (dropout differs across sequence shards and head shards), and the FP8 context of the
        delayed-scaling recipe."""
        stack = contextlib.ExitStack()
        if self.config.sequence_parallel:
            stack.enter_context(tensor_parallel.get_cuda_rng_tracker().fork())
        if self.config.fp8 and self.config.fp8_recipe == Fp8Recipe.delayed:
            stack.enter_context(get_fp8_context(self.config))
        return stack

    @staticmethod
    def _layer_context(layer):
        """Per-layer quantization context of the non-delayed FP8 recipes and of FP4 (as `TransformerBlock`)."""
        cfg = layer.config
        if cfg.fp8 and cfg.fp8_recipe != Fp8Recipe.delayed:
            return get_fp8_context(cfg, layer.layer_number - 1)
        if cfg.fp4:
            return get_fp4_context(cfg, layer.layer_number - 1)
        return contextlib.nullcontext()
