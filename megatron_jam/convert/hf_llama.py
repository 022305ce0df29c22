"""`LlamaForCausalLM` <-> Megatron-Core GPT (RoPE, RMSNorm, SwiGLU, grouped-query attention).

Facts this relies on (tests/test_convert.py checks logits against transformers):

- HF Llama checkpoints store q/k rows in the "rotate_half" order (halves of
  each head rotated together), which is Megatron's non-interleaved RoPE
  (`rotary_interleaved=False`), so q_proj and k_proj are copied unpermuted;
  Megatron's `RotaryEmbedding` uses the same inverse frequencies
  base^(-2i/d) as HF's default rope.
- Query head j uses key/value head j // (H/G) in both (HF's `repeat_kv`).
- No biases (`attention_bias` / `mlp_bias` must be false), RMSNorm with
  `rms_norm_eps`, untied output unless `tie_word_embeddings`.
- Rope scaling (Llama 3.1 "llama3", linear, dynamic, yarn) is refused: Megatron's
  plain `RotaryEmbedding` would silently compute something else.
"""

from megatron_jam.convert.common import EMB, FC1_W, OUT, QKV_W, ConvertError
from megatron_jam.convert.hf_family import HFFamily
from megatron_jam.models.config import ParentConfig


def parent_config(hf: dict, where: str = "config.json") -> tuple[ParentConfig, int, bool]:
    """HF LlamaConfig dict -> (ParentConfig, vocab_size, tied); ConvertError for what Megatron cannot express."""
    h, d = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = [
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (only 'silu' / SwiGLU)"),
        (rope_type == "default", f"rope type {rope_type!r} (only the default RoPE, no scaling)"),
        (not hf.get("attention_bias", False), "attention_bias=true (Megatron biases cover all linears)"),
        (not hf.get("mlp_bias", False), "mlp_bias=true"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConvertError(f"{where}: unsupported Llama setting {what}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    head_dim = hf.get("head_dim") or d // h  # heads of their own width (kv_channels) when head_dim x heads != d
    p = ParentConfig(
        family="llama", num_layers=hf["num_hidden_layers"], hidden_size=d, num_attention_heads=h,
        num_query_groups=hf.get("num_key_value_heads") or h, ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], add_bias_linear=False, learnable_norm=True,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=int(theta) if float(theta).is_integer() else theta,
        activation="swiglu", kv_channels=None if head_dim * h == d else head_dim)
    return p, hf["vocab_size"], bool(hf.get("tie_word_embeddings", False))


def hf_config(p: ParentConfig, vocab_size: int, tied: bool, base: dict | None = None) -> dict:
    """A transformers LlamaConfig dict for `p` (fields of `base`, e.g. token ids, kept)."""
    if (p.family != "llama" or p.act != "swiglu" or p.add_bias_linear or not p.learnable_norm
            or p.norm_zero_centered or p.embedding_multiplier != 1.0):
        raise ConvertError(f"cannot export {p} as LlamaForCausalLM (needs family 'llama', SwiGLU, no biases, "
                           f"learnable RMSNorm, unscaled embeddings)")
    shape = dict(vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.ffn_size,
                 num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
                 num_key_value_heads=p.query_groups, head_dim=p.head_dim,
                 max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.norm_epsilon,
                 rope_parameters={"rope_type": "default", "rope_theta": float(p.rotary_base)},
                 tie_word_embeddings=tied, attention_bias=False, mlp_bias=False, hidden_act="silu")
    keep = {k: v for k, v in (base or {}).items() if k not in shape and k not in ("rope_scaling", "rope_theta")}
    return keep | shape | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


FAMILY = HFFamily(
    name="LlamaForCausalLM",
    layer_prefix="model.layers.{i}.",
    layer_map=lambda p: {"self_attn.o_proj.weight": "self_attention.linear_proj.weight",
                         "mlp.down_proj.weight": "mlp.linear_fc2.weight",
                         "input_layernorm.weight": "input_layernorm.weight",
                         "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"},
    qkv_map=lambda p: [(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV_W)],
    fc1_map=lambda p: [(("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1_W)],
    top_map=lambda p, tied: {
        "embedding": {"model.embed_tokens.weight": EMB},
        "final": {"model.norm.weight": "decoder.final_layernorm.weight"} | ({} if tied else {"lm_head.weight": OUT}),
    },
)
