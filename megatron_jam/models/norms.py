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


class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm that scales by `1 + weight` (Megatron's `layernorm_zero_centered_gamma`; Gemma's norm), in fp32
    as transformers' `GemmaRMSNorm`: `(rms_norm(x.float()) * (1 + weight.float())).type_as(x)`. The weight is
    stored zero-centred, so a bf16 copy keeps its small values exactly (`1 + w` in bf16 would not)."""

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.rms_norm(x.float(), self.normalized_shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class JamNorm:
    """Factory returning `torch.nn.LayerNorm` or `torch.nn.RMSNorm` (state-dict keys unchanged), or
    `ZeroCenteredRMSNorm` when the config asks for a zero-centred gamma."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                learnable: bool = True, **unused) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            if config.normalization != "RMSNorm" or not learnable:
                raise ValueError("a zero-centred gamma needs a learnable RMSNorm (Gemma's)")
            norm = ZeroCenteredRMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
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


class PerHeadLayerNorm(torch.nn.Module):
    """Chameleon's query/key norm: a LayerNorm over head_dim with a weight and bias *per head*.

    Why not Megatron-Core's `q_layernorm` / `k_layernorm` modules: those hold one
    `[head_dim]` weight shared by all heads and follow the body's norm type (RMSNorm
    in a Llama-style body); Chameleon normalises each head with LayerNorm statistics
    (no affine, eps 1e-5) and then applies that head's own weight and bias
    (`ChameleonLayerNorm` in transformers). Parameters are `[heads, head_dim]`, split
    across TP on dim 0 exactly like the heads (Megatron gives rank r the contiguous
    heads [r * H / tp, (r + 1) * H / tp)), so JAM-Width's stacked heads keep their
    parent's norms. Built through the attention's `q_layernorm` / `k_layernorm` spec
    slots (params `{"heads": "query" | "key"}`): applied after QKV, before RoPE.
    """

    EPS = 1e-5
    """Chameleon's fixed epsilon (not the body's `rms_norm_eps`)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, heads: str = "query", **unused):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        tp = config.tensor_model_parallel_size
        total = config.num_attention_heads if heads == "query" else config.num_query_groups
        if total % tp:
            raise ValueError(f"per-head {heads} norm: {total} heads are not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        shape = (total // tp, hidden_size)
        self.weight = torch.nn.Parameter(torch.ones(shape, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(shape, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(p, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [sq, b, heads(/tp), head_dim] -> same shape."""
        y = torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, eps=self.EPS)
        return y * self.weight + self.bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Both tensors TP-sharded on the head dim (so any TP re-shards a checkpoint exactly)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"weight": 0, "bias": 0}, sharded_offsets,
                                                   tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])


_POST_NORM_CLASSES: dict = {}


def post_norm_linear(linear_cls: type) -> type:
    """`linear_cls` (a row-parallel linear) followed by the body's norm: Chameleon-30B's "swin" placement.

    Why inside the linear: the swin layer computes `x + norm(attn(x))` and `h + norm(mlp(h))`;
    Megatron-Core's `TransformerLayer` has no post-attention or post-MLP norm slot, but its attention
    output projection and MLP fc2 are spec slots, and both the full forward and our incremental
    decoder (`inference/stepper.py`) go through them. The output bias is added before the norm and
    none is returned. Under sequence parallelism the norm sees the reduce-scattered `[s/tp, b, d]`
    output: its parameters are marked `sequence_parallel` by `JamNorm` so their gradients are
    all-reduced. State-dict key: `<linear>.norm.weight` (replicated across TP).
    """
    if linear_cls not in _POST_NORM_CLASSES:
        def __init__(self, input_size, output_size, *args, config, **kwargs):
            linear_cls.__init__(self, input_size, output_size, *args, config=config, **kwargs)
            self.norm = JamNorm(config, output_size, eps=config.layernorm_epsilon)

        def forward(self, x, *args, **kwargs):
            out, bias = linear_cls.forward(self, x, *args, **kwargs)
            return self.norm(out if bias is None else out + bias), None

        _POST_NORM_CLASSES[linear_cls] = type(f"PostNorm{linear_cls.__name__}", (linear_cls,),
                                              {"__init__": __init__, "forward": forward,
                                               "__doc__": post_norm_linear.__doc__})
    return _POST_NORM_CLASSES[linear_cls]
