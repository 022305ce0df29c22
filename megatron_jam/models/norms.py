"""LayerNorm / RMSNorm for the local (non-Transformer-Engine) layer specs.

Why not Megatron-Core's `WrappedTorchNorm`: it refuses sequence parallelism
and always has learnable parameters. Under sequence parallelism each TP rank
sees a different slice of the sequence, so a norm's parameter gradients are
partial sums that Megatron's `finalize_model_grads` all-reduces across TP for
every parameter marked `sequence_parallel=True` (apex and TE mark theirs the
same way). CM3leon has no learnable norm parameters, hence `learnable`.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class JamNorm:
    """Factory returning `torch.nn.LayerNorm` or `torch.nn.RMSNorm` (state-dict keys unchanged)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                learnable: bool = True, **unused) -> torch.nn.Module:
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=learnable,
                                      bias=learnable, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, elementwise_affine=learnable,
                                    dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
