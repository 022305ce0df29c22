"""Core attention for the local (non-Transformer-Engine) specs: PyTorch's fused kernels or Megatron's unfused math.

Why: Megatron-Core's local `DotProductAttention` materialises the `[b, heads, s, s]` scores and their softmax
(about 20% MFU on an H200 at 7B shapes, docs/gpu.md); Transformer Engine's fused attention cannot be installed
everywhere. `torch.nn.functional.scaled_dot_product_attention` (SDPA) brings the flash and memory-efficient
kernels with no extra package. Which one runs follows Megatron-LM's `--attention-backend`
(`TransformerConfig.attention_backend`), so the spec never changes, only the config:

- `auto` (the default): SDPA, PyTorch picks the kernel (flash / memory-efficient / math);
- `flash`, `fused`: SDPA restricted to the flash or the memory-efficient kernel (on CUDA; on CPU PyTorch's
  math kernel is all there is);
- `unfused`, `local`: Megatron-Core's `DotProductAttention` unchanged (scores, masked softmax, dropout, bmm).

Both compute the same function (tests/test_attention.py: outputs and gradients in fp32, GQA, causal self- and
cross-attention, TP=2 with sequence parallelism). Masks follow Megatron's convention (boolean, True = masked);
an explicit mask is applied as Megatron's unfused path does (-10000 added), so a query whose every key is
masked (a padding slot in batched decoding) averages the values instead of producing NaN. SDPA also takes
that additive mask directly (`additive_mask`): the decoder converts its step's mask once, not in every layer.
"""

import contextlib

import torch
from torch import Tensor
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

NVTE_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
"""How Megatron-Core's `LanguageModule` pins one attention backend per process (asserting on a change)."""
MASKED_SCORE = -10000.0
"""What Megatron's `attention_mask_func` writes into masked scores."""
UNFUSED = (AttnBackend.unfused, AttnBackend.local)


class JamDotProductAttention(DotProductAttention):
    """`DotProductAttention` whose forward is SDPA unless the config asks for the unfused backend."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.attention_backend not in UNFUSED:
            unsupported = {"window_size": config.window_size, "softmax_type": config.softmax_type != "vanilla",
                           "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling}
            bad = [f"{k}={getattr(config, k)!r}" for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"--attention-backend {config.attention_backend.name} (PyTorch SDPA) does not "
                                 f"support {', '.join(bad)}; use --attention-backend unfused")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` (this TP rank's heads) -> `[sq, b, np * hn]`."""
        if self.config.attention_backend in UNFUSED:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need Transformer Engine's attention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, heads, s, hn]
        mask, causal = None, False
        if attention_mask is not None:  # boolean (True = masked), or already additive (the decoder's, per step)
            mask = additive_mask(attention_mask, q.dtype) if attention_mask.dtype == torch.bool \
                else attention_mask.to(q.dtype)  # SDPA wants the query's dtype (no-op when it already is)
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and q.shape[2] > 1:
            causal = True  # top-left aligned, as Megatron's default causal mask (sq == sk here)
        dropout = self.attention_dropout.p if self.training else 0.0
        with self._dropout_rng(dropout), self._kernels(q):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1])
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)  # [sq, b, np * hn]

    def _dropout_rng(self, dropout: float):
        """Megatron's RNG discipline for attention dropout: the model-parallel stream unless sequence
        parallelism already forked it for the whole block."""
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _kernels(self, q: Tensor):
        """Restrict SDPA to one kernel for `flash` / `fused` on CUDA (PyTorch chooses under `auto`)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {AttnBackend.flash: SDPBackend.FLASH_ATTENTION,
                  AttnBackend.fused: SDPBackend.EFFICIENT_ATTENTION}.get(self.config.attention_backend)
        if kernel is None or not q.is_cuda:
            return contextlib.nullcontext()
        return sdpa_kernel(kernel)


def additive_mask(masked: Tensor, dtype: torch.dtype) -> Tensor:
    """Megatron's boolean mask (True = masked) as the scores' addend: 0 where attended, -10000 where masked."""
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill(masked, MASKED_SCORE)


def takes_additive_mask(model) -> bool:
    """Whether every core attention of `model` is ours on SDPA (which takes `additive_mask`'s output)."""
    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(c, JamDotProductAttention) and c.config.attention_backend not in UNFUSED
                               for c in cores)


def forget_attention_backend() -> None:
    """Unpin the process's attention backend, so that a test or a benchmark can build the same model with
    another `--attention-backend` in one process (a training run uses one and never needs this)."""
    import os

    for name in NVTE_VARIABLES:
        os.environ.pop(name, None)
