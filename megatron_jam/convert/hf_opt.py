"""`OPTForCausalLM` <-> Megatron-Core GPT (learned positions, LayerNorm, ReLU MLP; CM3leon's architecture).

Facts this relies on (tests/test_convert.py checks logits against transformers):

- HF's `OPTLearnedPositionalEmbedding` has 2 extra rows at the top: position
  p reads row p + 2. Megatron's table is rows [2:]; the two unused rows are
  kept under `hf_extra.embed_positions_head` so an export gives the original
  tensor back exactly.
- Pre-norm only (`do_layer_norm_before` true; OPT-350m is post-norm and is
  refused), no project_in/project_out (`word_embed_proj_dim` must equal
  `hidden_size`), a final LayerNorm (`_remove_final_layer_norm` false).
- `enable_bias` -> biases on every linear; `layer_norm_elementwise_affine`
  -> learnable LayerNorm weight and bias (CM3leon: both false).
- Tied output embedding unless `tie_word_embeddings` is false.
- Dropout is a training setting; converted configs have none (CM3leon trains without).
"""

import torch

from megatron_jam.convert.common import EMB, FINAL, HF_EXTRA, OUT, POS, QKV_B, QKV_W, ConvertError
from megatron_jam.convert.hf_family import HFFamily
from megatron_jam.models.config import ParentConfig

POS_OFFSET = 2
POS_HEAD = HF_EXTRA + "embed_positions_head"


def parent_config(hf: dict, where: str = "config.json") -> tuple[ParentConfig, int, bool]:
    """HF OPTConfig dict -> (ParentConfig, vocab_size, tied); ConvertError for unsupported variants."""
    d = hf["hidden_size"]
    act = hf.get("activation_function", "relu")
    checks = [
        (hf.get("do_layer_norm_before", True), "do_layer_norm_before=false (post-norm OPT such as OPT-350m)"),
        (hf.get("word_embed_proj_dim", d) == d,
         f"word_embed_proj_dim={hf.get('word_embed_proj_dim')} != hidden_size={d} (project_in/project_out)"),
        (not hf.get("_remove_final_layer_norm", False), "_remove_final_layer_norm=true"),
        (act in ("relu", "gelu"), f"activation_function={act!r} (only 'relu' or 'gelu')"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConvertError(f"{where}: unsupported OPT setting {what}")
    bias = bool(hf.get("enable_bias", True))
    p = ParentConfig(
        family="opt", num_layers=hf["num_hidden_layers"], hidden_size=d,
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"], add_bias_linear=bias,
        learnable_norm=bool(hf.get("layer_norm_elementwise_affine", True)), norm_epsilon=1e-5, activation=act)
    return p, hf["vocab_size"], bool(hf.get("tie_word_embeddings", True))


def hf_config(p: ParentConfig, vocab_size: int, tied: bool, base: dict | None = None) -> dict:
    """A transformers OPTConfig dict for `p` (fields of `base`, e.g. token ids, kept)."""
    if p.family != "opt" or p.act not in ("relu", "gelu") or p.query_groups != p.num_attention_heads:
        raise ConvertError(f"cannot export {p} as OPTForCausalLM (needs family 'opt', ReLU/GELU, no GQA)")
    shape = dict(vocab_size=vocab_size, hidden_size=p.hidden_size, word_embed_proj_dim=p.hidden_size,
                 ffn_dim=p.ffn_size, num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
                 max_position_embeddings=p.max_position_embeddings, do_layer_norm_before=True,
                 _remove_final_layer_norm=False, activation_function=p.act, enable_bias=p.add_bias_linear,
                 layer_norm_elementwise_affine=p.learnable_norm, tie_word_embeddings=tied)
    keep = {k: v for k, v in (base or {}).items() if k not in shape}
    return keep | shape | {"model_type": "opt", "architectures": ["OPTForCausalLM"]}


def _layer_map(p: ParentConfig) -> dict[str, str]:
    m = {"self_attn.out_proj.weight": "self_attention.linear_proj.weight",
         "fc1.weight": "mlp.linear_fc1.weight", "fc2.weight": "mlp.linear_fc2.weight"}
    if p.add_bias_linear:
        m |= {"self_attn.out_proj.bias": "self_attention.linear_proj.bias",
              "fc1.bias": "mlp.linear_fc1.bias", "fc2.bias": "mlp.linear_fc2.bias"}
    if p.learnable_norm:
        m |= {f"self_attn_layer_norm.{k}": f"input_layernorm.{k}" for k in ("weight", "bias")}
        m |= {f"final_layer_norm.{k}": f"pre_mlp_layernorm.{k}" for k in ("weight", "bias")}
    return m


def _qkv_map(p: ParentConfig) -> list:
    names = [((f"self_attn.{x}_proj.weight" for x in "qkv"), QKV_W)]
    if p.add_bias_linear:
        names.append(((f"self_attn.{x}_proj.bias" for x in "qkv"), QKV_B))
    return [(tuple(n), mk) for n, mk in names]


def _top_map(p: ParentConfig, tied: bool) -> dict:
    final = {f"model.decoder.final_layer_norm.{k}": FINAL + k for k in ("weight", "bias")} if p.learnable_norm else {}
    return {"embedding": {"model.decoder.embed_tokens.weight": EMB, "model.decoder.embed_positions.weight": POS},
            "final": final | ({} if tied else {"lm_head.weight": OUT})}


def _split_positions(sd: dict) -> dict:
    if POS in sd:
        table = sd[POS]
        sd = sd | {POS: table[POS_OFFSET:].contiguous(), POS_HEAD: table[:POS_OFFSET].clone()}
    return sd


def _join_positions(sd: dict, p: ParentConfig) -> dict:
    if POS in sd:
        head = sd.pop(POS_HEAD, None)
        if head is None:  # a checkpoint that never was HF: rows HF reads only for padding
            head = torch.zeros(POS_OFFSET, sd[POS].shape[1], dtype=sd[POS].dtype)
        sd[POS] = torch.cat([head, sd[POS]], dim=0)
    return sd


FAMILY = HFFamily(
    name="OPTForCausalLM",
    layer_prefix="model.decoder.layers.{i}.",
    layer_map=_layer_map,
    qkv_map=_qkv_map,
    fc1_map=lambda p: [],
    top_map=_top_map,
    hf_shape_fix={POS: lambda s: (s[0] + POS_OFFSET, *s[1:])},
    to_megatron_fix=_split_positions,
    to_hf_fix=_join_positions,
)
