"""From our configs to Megatron-Core objects: `TransformerConfig`s and the parent `GPTModel`.

Why one place: the parent decoders, the JAM-Cross streams and its cross
blocks must agree on every Megatron knob (norm type, activation, fusions
that need CUDA kernels, dtypes); building them all here keeps a parent's
stream inside JAM-Cross bit-identical to the standalone parent.
"""

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_jam.models.config import JamCrossConfig, ParentConfig
from megatron_jam.models.specs import block_spec, parent_layer_spec

_ACTIVATIONS = {"gelu": (F.gelu, False), "relu": (F.relu, False), "swiglu": (F.silu, True),
                "geglu": (partial(F.gelu, approximate="tanh"), True)}


def parent_transformer_config(p: ParentConfig, **parallel) -> TransformerConfig:
    """Megatron-Core config of one parent; `parallel` takes `ModelParallelConfig` fields
    (tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel, bf16, ...)."""
    act, gated = _ACTIVATIONS[p.act]
    on_gpu = torch.cuda.is_available()
    parallel.setdefault("use_cpu_initialization", not on_gpu)
    if parallel.get("pipeline_model_parallel_size", 1) > 1:
        parallel.setdefault("pipeline_dtype", parallel.get("params_dtype", torch.float32))
    return TransformerConfig(
        num_layers=p.num_layers,
        hidden_size=p.hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_query_groups=p.query_groups,
        kv_channels=p.head_dim,
        ffn_hidden_size=p.ffn_size,
        normalization="RMSNorm" if p.family == "llama" else "LayerNorm",
        layernorm_epsilon=p.norm_epsilon,
        layernorm_zero_centered_gamma=p.norm_zero_centered,
        activation_func=act,
        gated_linear_unit=gated,
        add_bias_linear=p.add_bias_linear,
        hidden_dropout=p.hidden_dropout,
        attention_dropout=p.attention_dropout,
        # Fused kernels exist only with CUDA (apex / TE); the math is the same.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **parallel,
    )


def cross_transformer_config(cfg: JamCrossConfig, p: ParentConfig, **parallel) -> TransformerConfig:
    """Config of one direction's cross blocks: MHA (Megatron's CrossAttention has no GQA),
    a non-gated GELU MLP of `cross_ffn_size`, one block per `cross_every` parent layers."""
    base = parent_transformer_config(p, **parallel)
    if base.recompute_granularity == "full":  # the JAM-Cross layer loop recomputes cross blocks with their step
        base = dataclasses.replace(base, recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    return dataclasses.replace(
        base,
        num_layers=cfg.num_cross_pairs,
        num_query_groups=p.num_attention_heads,
        ffn_hidden_size=cfg.cross_ffn_size,
        activation_func=F.gelu,
        gated_linear_unit=False,
    )


def embedding_scale(p: ParentConfig, config: TransformerConfig) -> float | None:
    """`p.embedding_multiplier` rounded to the weights' dtype (as transformers' Gemma does: sqrt(3072) is
    55.4256 in fp32, 55.5 in bf16); None when there is nothing to scale. A Python number, not a tensor, so a
    captured decode step (CUDA graphs) carries it as a kernel argument."""
    if p.embedding_multiplier == 1.0:
        return None
    return float(torch.tensor(p.embedding_multiplier, dtype=config.params_dtype, device="cpu"))  # not meta


def scale_word_embeddings(model: GPTModel, p: ParentConfig) -> None:
    """Multiply `model.embedding`'s output by the parent's embedding multiplier (a forward hook: the module and
    its state-dict keys stay Megatron-Core's, and the decoder, which calls `model.embedding`, gets it too)."""
    scale = embedding_scale(p, model.config)
    if scale is not None and getattr(model, "pre_process", False):
        model.embedding.register_forward_hook(lambda module, args, out: out * scale)


def build_parent_gpt(p: ParentConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                     use_te: bool = False, vp_stage: int | None = None,
                     share_embeddings_and_output_weights: bool = True, **parallel) -> GPTModel:
    """A parent decoder as Megatron-Core's `GPTModel` (the stage of it this rank holds)."""
    from megatron.core import parallel_state

    config = parent_transformer_config(p, **parallel)
    n_local = get_num_layers_to_build(config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
    spec = block_spec(parent_layer_spec(p, use_te), n_local, p.learnable_norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=p.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope" if p.family == "llama" else "learned_absolute",
        rotary_base=p.rotary_base,
        vp_stage=vp_stage,
    )
    scale_word_embeddings(model, p)
    return model
