"""Decode-time forward of a JAM model over new slots, reading and extending a `KVCache`.

Why not call the layers' `forward`: a Megatron `TransformerLayer` computes
attention over the keys of its input only (or through an inference context
keyed by layer number, see kv_cache.py). Here each layer is run from its own
submodules, in the order `TransformerLayer._forward_attention` runs them:

    self-attention layer:  input_layernorm -> linear_qkv (get_query_key_value_tensors)
                           -> RoPE -> [append K, V] -> core_attention -> linear_proj
                           -> self_attn_bda -> _forward_mlp (pre_mlp_layernorm, mlp, mlp_bda)
    cross block:           pre_cross_attn_layernorm -> linear_q(h), linear_kv(context)
                           -> [append K, V] -> core_attention -> linear_proj
                           -> cross_attn_bda -> _forward_mlp

so the numerics are Megatron's own (same modules, same masked softmax with
an explicit mask instead of the implicit causal one), tensor parallelism
works unchanged (column-parallel QKV, heads split across TP, row-parallel
projection), and only the attended keys change: the cached slots plus the new
ones. The cross blocks' keys/values come from the *other* stream's hidden
states entering parent layer l at the new slots (eq. 4), cached like
self-attention's. Logits are computed for the last new slot only and
gathered over TP ranks (`[b, V]` on every rank).

Pipeline parallelism is not supported for generation (one stage must hold
the whole model); `build_stepper` says so.
"""

import torch
from megatron.core import tensor_parallel
from torch import Tensor

from megatron_jam.inference.kv_cache import KVCache, SlotTable
from megatron_jam.models.attention import additive_mask, takes_additive_mask


def self_attention_layer(layer, h: Tensor, cache: KVCache, name: str, start: int | Tensor, mask: Tensor,
                         rope: Tensor | None) -> Tensor:
    """One parent (self-attention) `TransformerLayer` over new slots `h` `[n, b, d]`."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    attn = layer.self_attention
    x = layer.input_layernorm(h)
    q, k, v = attn.get_query_key_value_tensors(x, None)  # [n, b, np(/tp), hn], [n, b, ng(/tp), hn] x2
    if rope is not None:
        q = apply_rotary_pos_emb(q, rope, config=attn.config, cp_group=attn.pg_collection.cp)
        k = apply_rotary_pos_emb(k, rope, config=attn.config, cp_group=attn.pg_collection.cp)
    k, v = cache.store(name, start, k, v)  # [start + n (capacity when static), b, ng, hn]
    out = attn.linear_proj(attn.core_attention(q, k, v, mask))  # [n, b, d] after the TP all-reduce
    h = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(out, h, layer.hidden_dropout)
    return layer._forward_mlp(h)


def cross_attention_layer(layer, h: Tensor, context: Tensor, cache: KVCache, name: str, start: int | Tensor,
                          mask: Tensor) -> Tensor:
    """One cross block: queries from `h`, keys/values from `context` (both `[n, b, d]`, new slots)."""
    attn = layer.cross_attention
    x = layer.pre_cross_attn_layernorm(h)
    q, k, v = attn.get_query_key_value_tensors(x, context)  # [n, b, np(/tp), hn] x3
    k, v = cache.store(name, start, k, v)
    out = attn.linear_proj(attn.core_attention(q, k, v, mask))
    h = layer.cross_attn_bda(layer.training, layer.config.bias_dropout_fusion)(out, h, layer.hidden_dropout)
    return layer._forward_mlp(h)


class _Stepper:
    """Common part: mask, logits of the last new slot, vocabulary gather."""

    def __init__(self, model, max_positions: int):
        self.model = model
        self.max_positions = max_positions
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.additive_mask = takes_additive_mask(model)
        """SDPA core attention: the boolean mask becomes an additive one once per step, not once per layer."""
        self._rope_tables: dict[int, Tensor] = {}

    @torch.no_grad()
    def step(self, slots: SlotTable, cache: KVCache, start: int, n: int) -> Tensor:
        """Run slots [start, start+n) (already in `slots`); return full-vocabulary logits `[b, V_padded]`
        of slot start+n-1 (float32, on the CPU)."""
        dev = self.device  # the slot table lives on the CPU; the model may be on a GPU
        tokens = slots.tokens[:, start:start + n].to(dev)
        positions = slots.positions[:, start:start + n].to(dev)
        mask = self.attention_mask(slots.attention_mask(start, n).to(dev))
        return self.forward(tokens, positions, cache, start, mask).float().cpu()  # sampling runs on the CPU

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, start: int | Tensor, mask: Tensor) -> Tensor:
        """Logits `[b, V_padded]` of the last of the new slots `tokens` / `positions` `[b, n]` (on the model's
        device). `start`: first new slot (an int), or a device tensor `[n]` of slot indices for fixed shapes
        (static_decode.py: the cache is attended whole, `mask` covers every slot)."""
        hidden = self._hidden(tokens, positions, cache, start, mask)[-1:]  # [1, b, d]
        logits = self._logits(hidden)  # [1, b, V/tp]
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[0]  # [b, V]

    def attention_mask(self, masked: Tensor) -> Tensor:
        """Megatron's boolean mask (True = masked), or its additive form for SDPA."""
        return additive_mask(masked, self.dtype) if self.additive_mask else masked

    def _rope(self, rotary, positions: Tensor) -> Tensor | None:
        """RoPE angles at per-row positions `[b, n]` -> `[n, b, 1, dim]` (the full forward's table, built once)."""
        if rotary is None:
            return None
        if id(rotary) not in self._rope_tables:
            self._rope_tables[id(rotary)] = rotary(self.max_positions)[:, 0, 0, :]  # [max_len, dim]
        return self._rope_tables[id(rotary)][positions.t()].unsqueeze(2)

    def rope_tables(self) -> list[Tensor]:
        return list(self._rope_tables.values())

    def _output(self, hidden: Tensor) -> Tensor:
        m = self.model
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        return m.output_layer(hidden, weight=weight)[0]


class GPTStepper(_Stepper):
    """JamGPTModel (imported parent, JAM-Uniform, JAM-Width): Megatron `GPTModel` internals."""

    def _hidden(self, tokens, positions, cache, start, mask) -> Tensor:
        m = self.model
        h = m.embedding(input_ids=tokens, position_ids=positions)  # [n, b, d]
        rope = self._rope(getattr(m, "rotary_pos_emb", None) if m.position_embedding_type == "rope" else None,
                          positions)
        for i, layer in enumerate(m.decoder.layers):
            h = self_attention_layer(layer, h, cache, f"decoder.{i}", start, mask, rope)
        return m.decoder.final_layernorm(h)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self._output(hidden)


class CrossStepper(_Stepper):
    """JamCrossModel: two streams, cross blocks before every k-th parent layer, fusion linear."""

    def _hidden(self, tokens, positions, cache, start, mask) -> Tensor:
        m = self.model
        h_llm, h_img = m.embedding(tokens, positions)  # [n, b, d] each
        rope_llm = self._rope(getattr(m, "llm_rotary", None), positions)
        rope_img = self._rope(getattr(m, "img_rotary", None), positions)
        rope = {"llm": rope_llm, "img": rope_img}
        # The model's own loop (eq. 4's order, slots, contexts) with cached attention at the new slots.
        h_llm, h_img = m.layer_loop.run(
            h_llm, h_img,
            parent=lambda name, i, layer, h: self_attention_layer(layer, h, cache, f"{name}.{i}", start, mask,
                                                                  rope[name]),
            cross=lambda name, j, block, h, context: cross_attention_layer(block, h, context, cache,
                                                                           f"{name}_cross.{j}", start, mask))
        return torch.cat([m.llm.final_layernorm(h_llm), m.img.final_layernorm(h_img)], dim=-1)  # [n, b, 2d]

    def _logits(self, hidden: Tensor) -> Tensor:
        d = hidden.shape[-1] // 2
        return self._output(self.model.fusion(hidden[..., :d], hidden[..., d:]))


STEPPERS = {"gpt": GPTStepper, "jam_cross": CrossStepper}
"""Model kind (`models.kinds`) -> its incremental decoder."""


def max_positions(cfg) -> int:
    """Rows of the position tables (the hard context limit of the model)."""
    from megatron_jam.models.kinds import parents

    return min(p.max_position_embeddings for p in parents(cfg))


def build_stepper(model, cfg) -> _Stepper:
    """The stepper for a whole (single pipeline stage) model in eval mode."""
    from megatron_jam.parallel.model import unwrap

    model = unwrap(model)
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs the whole model on one pipeline stage: "
                         "pipeline-model-parallel-size must be 1 (use tensor parallelism to split a large model)")
    if model.config.sequence_parallel:
        raise ValueError("generation runs without sequence parallelism; build the model with sequence_parallel=False")
    model.eval()
    return STEPPERS[cfg.MODEL_TYPE](model, max_positions(cfg))
