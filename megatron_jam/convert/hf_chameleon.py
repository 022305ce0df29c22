"""`ChameleonForConditionalGeneration` (Chameleon 7B/30B, Anole, Lumina-mGPT) <-> Megatron-Core GPT.

Chameleon's body is Llama's (RMSNorm, SwiGLU, RoPE in HF's rotate_half order,
no biases, untied lm_head) plus two things Megatron-Core's stock layer lacks,
which our layer spec adds (`models.specs.parent_layer_spec`):

- per-head q/k LayerNorm: `self_attn.q_norm.{weight,bias}` `[heads, head_dim]`
  and `k_norm` `[kv_heads, head_dim]` -> `self_attention.{q,k}_layernorm.*`
  (`models.norms.PerHeadLayerNorm`). The original checkpoints (and
  Lumina-mGPT's) hold one row per model-parallel shard,
  `[model_parallel_size, head_dim]`, applied to every head of that shard;
  transformers' conversion repeats each row over its shard's heads, and so do
  we on import (`model_parallel_size` from config.json). Export writes
  transformers' `[heads, head_dim]`.
- `swin_norm` (30B): `input_layernorm` is applied after attention and
  `post_attention_layernorm` after the MLP, inside the residual ->
  `self_attention.linear_proj.norm.weight`, `mlp.linear_fc2.norm.weight`.

Key names are Llama's under `model.` (both `save_pretrained` and in-memory
names; checked against transformers 5.24). The VQ encoder (`model.vqmodel.*`)
is no part of the Megatron model: like Emu3's it is copied into
`SAVE/image_tokenizer/` on import and back on export. Image codes are BPE
tokens inside the 65,536 vocabulary, so the vocabulary rows are taken whole.
"""

import dataclasses

from torch import Tensor

from megatron_jam.convert import hf_llama
from megatron_jam.convert.common import K_NORM, Q_NORM, SWIN_NORMS, ConvertError
from megatron_jam.convert.hf_family import HFFamily
from megatron_jam.convert.vq import ImageTokenizerSource, embedded_image_tokenizer, export_image_tokenizer
from megatron_jam.models.config import ParentConfig

ARCHITECTURE = "ChameleonForConditionalGeneration"
VQ_MODEL_TYPE = "chameleon_vqgan"
VQ_PREFIX = "model.vqmodel."
VQ_FILE = "model-vqmodel.safetensors"
DEFAULTS = dict(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                hidden_act="silu", model_parallel_size=1, swin_norm=False)
"""`ChameleonConfig`'s defaults (transformers 5.24), for fields a config.json leaves out."""
NOT_CHAMELEON = ("head_dim",)
"""LlamaConfig fields ChameleonConfig does not have (it derives head_dim)."""
_QK = {"self_attn.q_norm.": Q_NORM, "self_attn.k_norm.": K_NORM}


def parent_config(hf: dict, where: str = "config.json") -> tuple[ParentConfig, int, bool]:
    """HF ChameleonConfig dict -> (ParentConfig, vocab_size, tied); hf_llama's refusals plus the q/k norm
    shard count (`model_parallel_size` must divide the heads and the key/value heads)."""
    hf = DEFAULTS | hf
    p, vocab, tied = hf_llama.parent_config(hf, where=where)
    mp = hf.get("model_parallel_size") or 1
    for what, n in (("num_attention_heads", p.num_attention_heads), ("num_key_value_heads", p.query_groups)):
        if n % mp:
            raise ConvertError(f"{where}: {what}={n} is not divisible by model_parallel_size={mp} "
                               f"(the q/k norm rows are per model-parallel shard)")
    return dataclasses.replace(p, qk_layernorm=True, swin_norm=bool(hf.get("swin_norm"))), vocab, tied


def hf_config(p: ParentConfig, vocab_size: int, tied: bool, base: dict | None = None) -> dict:
    """A ChameleonConfig dict for `p`: `base`'s fields (vocabulary_map, vq_config, token ids) kept, the
    shape from `p`; q/k norms are written per head (`model_parallel_size` kept only as a record)."""
    if not p.qk_layernorm:
        raise ConvertError(f"cannot export {p} as {ARCHITECTURE}: it has no per-head q/k norm")
    llama = hf_llama.hf_config(p, vocab_size, tied, base=base)
    shape = {k: v for k, v in llama.items() if k not in NOT_CHAMELEON}
    return shape | {"swin_norm": p.swin_norm, "model_type": "chameleon", "architectures": [ARCHITECTURE]}


def _layer_map(p: ParentConfig) -> dict[str, str]:
    names = hf_llama.FAMILY.layer_map(p)
    if p.swin_norm:  # same HF names, applied after attention / after the MLP
        pre_attn, pre_mlp = "input_layernorm.weight", "post_attention_layernorm.weight"
        del names[pre_attn], names[pre_mlp]
        names |= {pre_attn: SWIN_NORMS[0] + "weight", pre_mlp: SWIN_NORMS[1] + "weight"}
    return names | {hf + kind: mg + kind for hf, mg in _QK.items() for kind in ("weight", "bias")}


def _per_head(model_parallel_size: int):
    """Read fix: a q/k norm stored per model-parallel shard `[mp, hd]` -> per head `[heads, hd]`."""
    def fix(name: str, t: Tensor, p: ParentConfig, where: str) -> Tensor:
        qk = next((mg for hf, mg in _QK.items() if hf in name), None)
        if qk is None or t.dim() != 2:
            return t
        heads = p.num_attention_heads if qk == Q_NORM else p.query_groups
        if t.shape[0] == heads:
            return t
        if t.shape[0] != model_parallel_size:
            raise ConvertError(f"{where}: tensor {name} has {t.shape[0]} rows; a Chameleon q/k norm has one row "
                               f"per head ({heads}) or per model-parallel shard (model_parallel_size="
                               f"{model_parallel_size} in config.json)")
        return t.repeat_interleave(heads // model_parallel_size, dim=0)
    return fix


FAMILY = dataclasses.replace(hf_llama.FAMILY, name=ARCHITECTURE, layer_map=_layer_map)
"""The layout export writes (transformers' per-head q/k norms)."""


def family_for(keys, where: str, hf: dict | None = None) -> HFFamily:
    """The family reading this checkpoint: q/k norms accepted per head or per `model_parallel_size` shard."""
    mp = int((hf or {}).get("model_parallel_size") or 1)
    return dataclasses.replace(FAMILY, read_fix=_per_head(mp))


def merge_base(hf: dict) -> dict:
    """What a merge records for export: the whole config (vocabulary_map, vq_config, ids)."""
    return dict(hf)


def image_tokenizer(hf: dict, files: dict[str, str], path: str) -> ImageTokenizerSource | None:
    """The VQ encoder stored with the language model (`model.vqmodel.*`), or None."""
    return embedded_image_tokenizer(hf, files, path, [VQ_PREFIX], VQ_MODEL_TYPE, "ChameleonVQVAE")


def export_extras(load: str, out_dir: str, hf_cfg: dict) -> tuple[dict, dict[str, str]]:
    """Put the VQ encoder back as `model.vqmodel.*` (`vq.export_image_tokenizer`)."""
    return export_image_tokenizer(load, out_dir, hf_cfg, VQ_PREFIX, VQ_FILE, ARCHITECTURE)
