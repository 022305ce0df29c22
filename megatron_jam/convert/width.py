"""JAM-Width (paper eqs. 2-3): one stack of width d_joint = d_llm + d_img, weights built blockwise.

Every linear weight W (PyTorch [out, in], the paper's Q = W H) becomes::

    copy    (eq. 2):  [[W_llm, W_llm],      average (eq. 3):  [[W_llm, W_avg],
                       [W_img, W_img]]                          [W_img, W_avg]]

with W_avg = (W_llm + W_img) / 2; rows [0, d) / columns [0, d) are the llm
half of the joint hidden state. This is applied to q, k, v separately (the
joint model has 2H heads and 2G query groups of the same head size; llm heads
first), to the gate and up halves of a SwiGLU fc1 separately, and to the
attention output and fc2. Biases, norms, token and position embeddings are
concatenated on the hidden dim ([llm, img]); Chameleon's per-head q/k norms
on the head dim (the joint heads are the llm's, then the img's). QKV is packed into Megatron's
grouped layout only after the blocks are built, which keeps each TP rank's
heads whole. Both parents must have the same architecture.
"""

import torch
from torch import Tensor

from megatron_jam.convert.common import (EMB, FC1_B, FC1_W, HF_EXTRA, K_NORM, OUT, POS, Q_NORM, QKV_B, QKV_W,
                                         ConvertError, pack_qkv, split_layer_key, split_qkv)
from megatron_jam.convert.uniform import check_same_architecture
from megatron_jam.convert.vocab import VocabPlan
from megatron_jam.models.config import ParentConfig
from megatron_jam.models.config import JamGPTConfig

INITS = ("copy", "average")


def width_parent(a: ParentConfig, b: ParentConfig) -> ParentConfig:
    """The joint stack's shape: hidden, heads, query groups and MLP width doubled; same head size and depth."""
    import dataclasses

    check_same_architecture(a, b, "width")
    return dataclasses.replace(a, hidden_size=2 * a.hidden_size, num_attention_heads=2 * a.num_attention_heads,
                               num_query_groups=2 * a.query_groups, ffn_hidden_size=2 * a.ffn_size)


def width_config(a: ParentConfig, b: ParentConfig, plan: VocabPlan, tied: bool, seq_length: int) -> JamGPTConfig:
    return JamGPTConfig(parent=width_parent(a, b), vocab_size=plan.vocab_size,
                        share_embeddings_and_output_weights=tied, seq_length=seq_length)


def block(a: Tensor, b: Tensor, init: str) -> Tensor:
    """Eq. 2 (`copy`) or eq. 3 (`average`) for two [out, in] matrices -> [2 out, 2 in]."""
    if init not in INITS:
        raise ConvertError(f"--width-init {init!r} is not one of {INITS}")
    o, i = a.shape
    out = a.new_empty(2 * o, 2 * i)  # filled block by block: no concatenated temporaries
    out[:o, :i], out[o:, :i] = a, b
    if init == "copy":
        out[:o, i:], out[o:, i:] = a, b
    else:
        out[:o, i:] = (a.float() + b.float()).div(2).to(a.dtype)
        out[o:, i:] = out[:o, i:]
    return out


def concat(a: Tensor, b: Tensor) -> Tensor:
    """Vectors (biases, norms) concatenated: [llm, img]."""
    return torch.cat([a, b], dim=0)


def widen_layer_tensor(key: str, a: Tensor, b: Tensor, p: ParentConfig, init: str) -> Tensor:
    """One layer tensor (layer-relative key) of the joint stack."""
    h, g = p.num_attention_heads, p.query_groups
    if key in (QKV_W, QKV_B):
        qa, ka, va = split_qkv(a, h, g)
        qb, kb, vb = split_qkv(b, h, g)
        join = (lambda x, y: block(x, y, init)) if key == QKV_W else concat
        return pack_qkv(join(qa, qb), join(ka, kb), join(va, vb), 2 * h, 2 * g)
    if key in (FC1_W, FC1_B) and p.gated:
        join = (lambda x, y: block(x, y, init)) if key == FC1_W else concat
        (ga, ua), (gb, ub) = torch.chunk(a, 2, dim=0), torch.chunk(b, 2, dim=0)
        return torch.cat([join(ga, gb), join(ua, ub)], dim=0)
    if key.startswith((Q_NORM, K_NORM)):  # per-head [heads, hd]: the joint heads are llm's, then img's
        return concat(a, b)
    return block(a, b, init) if a.dim() == 2 else concat(a, b)


def width_part(a: dict[str, Tensor], b: dict[str, Tensor], p: ParentConfig, plan: VocabPlan,
               init: str = "copy") -> dict[str, Tensor]:
    """Eqs. 2/3 on one part (canonical keys of the parents, `p` their common shape)."""
    a = {k: v for k, v in a.items() if not k.startswith(HF_EXTRA)}
    b = {k: v for k, v in b.items() if not k.startswith(HF_EXTRA)}
    out = {}
    for k, ta in a.items():
        if k not in b:
            raise ConvertError(f"tensor {k} is missing from the img parent")
        tb = b[k]
        if k not in (EMB, OUT) and ta.shape != tb.shape:
            raise ConvertError(f"tensor {k}: llm shape {tuple(ta.shape)} != img shape {tuple(tb.shape)}")
        if k in (EMB, OUT):
            out[k] = plan.fuse(ta, tb, lambda x, y: torch.cat([x, y], dim=1), lambda y: torch.cat([y, y], dim=1))
        elif k == POS:
            out[k] = torch.cat([ta, tb], dim=1)
        elif (lk := split_layer_key(k)) is not None:
            out[k] = widen_layer_tensor(lk[1], ta, tb, p, init)
        else:  # final norm
            out[k] = concat(ta, tb)
    missing = sorted(set(b) - set(a))
    if missing:
        raise ConvertError(f"tensor {missing[0]} is missing from the llm parent")
    return out
