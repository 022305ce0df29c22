"""Layer specs: which Megatron-Core modules build a parent layer and a cross block.

Local specs (Megatron-Core's own parallel linears, our `JamDotProductAttention`
-- PyTorch SDPA or Megatron's unfused attention per `--attention-backend` --, our
SP-aware `JamNorm`) run everywhere, CPU included; Transformer Engine specs are
chosen when TE is importable and asked for. The model code never changes,
only the spec (Megatron-Core's convention).

A cross block is a `TransformerLayer` with no self-attention: pre-norm,
causal `CrossAttention` (column-parallel Q and KV, row-parallel output, heads
split across TP), pre-norm, MLP; about 12 d^2 parameters (DESIGN.md, Table 4).
"""

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_jam.models.attention import JamDotProductAttention
from megatron_jam.models.config import ParentConfig
from megatron_jam.models.norms import JamNorm, PerHeadLayerNorm, post_norm_linear

try:  # Transformer Engine is optional (CUDA only).
    from megatron.core.extensions import transformer_engine as _te_ext
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = _te_ext.HAVE_TE
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TE = False


def norm_spec(learnable: bool) -> ModuleSpec:
    return ModuleSpec(module=JamNorm, params={"learnable": learnable})


def _require_te(use_te: bool) -> None:
    if use_te and not HAVE_TE:
        raise RuntimeError("Transformer Engine specs requested (--transformer-impl transformer_engine) "
                           "but transformer_engine is not importable; use --transformer-impl local")


def parent_layer_spec(p: ParentConfig, use_te: bool = False) -> ModuleSpec:
    """A parent decoder layer: pre-norm self-attention and MLP (GELU or SwiGLU per config), with
    Chameleon's per-head q/k LayerNorm (`p.qk_layernorm`) and "swin" norm placement (`p.swin_norm`)
    as spec choices."""
    if use_te and p.swin_norm:
        raise RuntimeError("the swin norm placement (Chameleon-30B) is built from local linears: "
                           "use --transformer-impl local")
    spec = _base_layer_spec(p.learnable_norm, use_te)
    if p.qk_layernorm:
        spec = _with_attention(spec, q_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"heads": "query"}),
                               k_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"heads": "key"}))
    if p.swin_norm:
        spec = _swin(spec)
    return spec


def _base_layer_spec(learnable_norm: bool, use_te: bool) -> ModuleSpec:
    _require_te(use_te)
    if use_te and learnable_norm:
        # TE fuses the norm into the following linear; norm type comes from the config.
        return get_gpt_layer_with_transformer_engine_spec()
    base = (get_gpt_layer_with_transformer_engine_spec() if use_te else get_gpt_layer_local_spec())
    sub = base.submodules
    if use_te:  # non-learnable norms: unfused TE linears with our norm in front
        sub = dataclasses.replace(sub, mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=_te_ext.TEColumnParallelLinear, linear_fc2=_te_ext.TERowParallelLinear)))
        base = _with_attention(dataclasses.replace(base, submodules=sub),
                               linear_qkv=_te_ext.TEColumnParallelLinear)
        sub = base.submodules
    sub = dataclasses.replace(sub, input_layernorm=norm_spec(learnable_norm),
                              pre_mlp_layernorm=norm_spec(learnable_norm))
    spec = dataclasses.replace(base, submodules=sub)
    return spec if use_te else _with_attention(spec, core_attention=JamDotProductAttention)


def _with_attention(spec: ModuleSpec, **attention_submodules) -> ModuleSpec:
    """`spec` with some of its self-attention's submodules replaced."""
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, **attention_submodules))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def _swin(spec: ModuleSpec) -> ModuleSpec:
    """Chameleon-30B's layer: `h = x + norm(attn(x))`, `out = h + norm(mlp(h))`, no pre-norms: the norms
    move into the attention's output projection and the MLP's fc2 (`post_norm_linear`)."""
    from megatron.core.transformer.identity_op import IdentityOp

    spec = _with_attention(spec, linear_proj=post_norm_linear(spec.submodules.self_attention.submodules.linear_proj))
    mlp = spec.submodules.mlp
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, linear_fc2=post_norm_linear(mlp.submodules.linear_fc2)))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, mlp=mlp))


def block_spec(layer_spec: ModuleSpec, num_layers_this_stage: int, learnable_norm: bool,
               ) -> TransformerBlockSubmodules:
    """A stack of `layer_spec` with our final norm (Megatron's default norm refuses SP on CPU)."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers_this_stage,
                                      layer_norm=norm_spec(learnable_norm))


def cross_layer_spec(learnable_norm: bool, use_te: bool = False) -> ModuleSpec:
    """A cross block: queries from this stream, keys/values from the other, causal."""
    _require_te(use_te)
    if use_te:
        col, row, core = _te_ext.TEColumnParallelLinear, _te_ext.TERowParallelLinear, _te_ext.TEDotProductAttention
    else:
        col, row, core = ColumnParallelLinear, RowParallelLinear, JamDotProductAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_cross_attn_layernorm=norm_spec(learnable_norm),
            cross_attention=ModuleSpec(
                module=CrossAttention,
                # Both streams read the same tokens: position i may only see <= i.
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=CrossAttentionSubmodules(
                    linear_q=col, linear_kv=col, core_attention=core, linear_proj=row),
            ),
            cross_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_spec(learnable_norm),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
