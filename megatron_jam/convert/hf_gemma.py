"""`GemmaForCausalLM` (Gemma 1; Liquid's body) <-> Megatron-Core GPT.

Gemma's tensors carry Llama's names (q/k/v/o, gate/up/down, input/post-attention norms, `model.norm`), so
the mapping *is* `hf_llama`'s. What differs is arithmetic, each a config field Megatron-Core expresses
(tests/test_convert_gemma.py checks logits against transformers):

- the RMSNorm scales by `1 + weight` in fp32 (`GemmaRMSNorm`): `norm_zero_centered` ->
  `layernorm_zero_centered_gamma` (our `ZeroCenteredRMSNorm` on local specs, Transformer Engine's own
  zero-centred norm on TE specs); the weights are copied unchanged;
- the MLP is GeGLU with GELU's tanh approximation (`hidden_act` "gelu_pytorch_tanh"; transformers reads
  the released configs' legacy "gelu" as the same): `activation="geglu"`;
- heads are `head_dim` wide independently of the width (Gemma-7B: 16 x 256 over d 3072):
  `kv_channels`;
- word embeddings are multiplied by sqrt(hidden_size), rounded to the weights' dtype
  (`GemmaTextScaledWordEmbedding`): `embedding_multiplier`;
- the output layer is the input embedding (`tie_word_embeddings`, default true).

Gemma 2 and 3 (soft-capping, sliding windows, extra norms) have other model types and are refused by
the reader.
"""

import dataclasses
import math

from megatron_jam.convert import hf_llama
from megatron_jam.convert.common import ConvertError
from megatron_jam.models.config import ParentConfig

ARCHITECTURE = "GemmaForCausalLM"
TANH_GELU = ("gelu_pytorch_tanh", "gelu")
"""`hidden_act` values that mean GELU's tanh approximation in transformers' Gemma ("gelu": the legacy value
of the official releases, mapped by `GemmaConfig`)."""


def parent_config(hf: dict, where: str = "config.json") -> tuple[ParentConfig, int, bool]:
    """HF GemmaConfig dict -> (ParentConfig, vocab_size, tied); ConvertError for what Megatron cannot express."""
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in TANH_GELU:
        raise ConvertError(f"{where}: unsupported Gemma setting hidden_act={act!r} (only {' / '.join(TANH_GELU)})")
    as_llama = {k: v for k, v in hf.items() if k != "hidden_activation"} | {"hidden_act": "silu"}
    llama, vocab, _ = hf_llama.parent_config(as_llama, where)  # RoPE, biases, head_dim, shapes: Llama's checks
    p = dataclasses.replace(llama, activation="geglu", norm_zero_centered=True,
                            embedding_multiplier=math.sqrt(hf["hidden_size"]))
    return p, vocab, bool(hf.get("tie_word_embeddings", True))


def hf_config(p: ParentConfig, vocab_size: int, tied: bool, base: dict | None = None) -> dict:
    """A transformers GemmaConfig dict for `p` (fields of `base`, e.g. token ids, kept)."""
    scale = math.sqrt(p.hidden_size)
    if p.act != "geglu" or not p.norm_zero_centered or not math.isclose(p.embedding_multiplier, scale, rel_tol=1e-9):
        raise ConvertError(f"cannot export {p} as {ARCHITECTURE}: it needs GeGLU, zero-centred RMSNorm and an "
                           f"embedding multiplier of sqrt(hidden_size) = {scale:.4f} (a JAM-Width of two Gemmas "
                           f"keeps its parents' {p.embedding_multiplier:.4f})")
    llama = hf_llama.hf_config(dataclasses.replace(p, activation="swiglu", norm_zero_centered=False,
                                                   embedding_multiplier=1.0), vocab_size, tied, base)
    return llama | {"hidden_act": "gelu_pytorch_tanh", "head_dim": p.head_dim, "model_type": "gemma",
                    "architectures": [ARCHITECTURE]}


def merge_base(hf: dict) -> dict:
    """What a merge records for export: the token ids and the Gemma model type."""
    return {k: v for k, v in hf.items() if k.endswith("token_id")} | {"model_type": "gemma"}


FAMILY = dataclasses.replace(hf_llama.FAMILY, name=ARCHITECTURE)
"""Llama's tensor names (the norms' zero-centred weights are copied as they are)."""
