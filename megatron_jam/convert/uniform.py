"""JAM-Uniform (paper eq. 1): theta = w * theta_llm + (1 - w) * theta_img, w = 0.5 by default.

Both parents must have the same architecture (every `ParentConfig` field);
the merged model has that shape. Vocabulary rows follow `vocab.VocabPlan`
(rows only the image model has are copied from it, not averaged with
nothing). Arithmetic is fp32, the result is cast to the first parent's dtype.
"""

import dataclasses

import torch
from torch import Tensor

from megatron_jam.convert.common import EMB, HF_EXTRA, OUT, ConvertError
from megatron_jam.convert.vocab import VocabPlan
from megatron_jam.models.config import ParentConfig
from megatron_jam.models.config import JamGPTConfig

CHUNK = 1 << 22
"""Elements per slice of the fp32 arithmetic."""


def check_same_architecture(a: ParentConfig, b: ParentConfig, method: str) -> None:
    """ConvertError listing every field on which the two parents differ."""
    diffs = [f"{f.name}: llm={getattr(a, f.name)!r}, img={getattr(b, f.name)!r}"
             for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)
             and f.name not in ("hidden_dropout", "attention_dropout")]
    if diffs:
        raise ConvertError(f"--method {method} needs parents of the same architecture; they differ in "
                           + "; ".join(diffs))


def uniform_config(a: ParentConfig, b: ParentConfig, plan: VocabPlan, tied: bool, seq_length: int) -> JamGPTConfig:
    check_same_architecture(a, b, "uniform")
    return JamGPTConfig(parent=a, vocab_size=plan.vocab_size, share_embeddings_and_output_weights=tied,
                        seq_length=seq_length)


def average(name: str, a: Tensor, b: Tensor, w: float) -> Tensor:
    """w * a + (1 - w) * b in fp32, cast to a's dtype; ConvertError naming the tensor on a shape mismatch."""
    if a.shape != b.shape:
        raise ConvertError(f"tensor {name}: llm shape {tuple(a.shape)} != img shape {tuple(b.shape)}")
    out = torch.empty(a.shape, dtype=a.dtype)
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.view(-1)
    for i in range(0, fo.numel(), CHUNK):  # in slices: fp32 temporaries stay small
        fo[i: i + CHUNK] = w * fa[i: i + CHUNK].float() + (1.0 - w) * fb[i: i + CHUNK].float()
    return out


def uniform_part(a: dict[str, Tensor], b: dict[str, Tensor], plan: VocabPlan, w: float = 0.5) -> dict[str, Tensor]:
    """Eq. 1 on one part (canonical keys); embedding rows per `plan`."""
    a = {k: v for k, v in a.items() if not k.startswith(HF_EXTRA)}
    b = {k: v for k, v in b.items() if not k.startswith(HF_EXTRA)}
    for mine, theirs, who in ((a, b, "img"), (b, a, "llm")):
        missing = sorted(set(mine) - set(theirs))
        if missing:
            raise ConvertError(f"tensor {missing[0]} is missing from the {who} parent")
    out = {}
    for k in a:
        if k in (EMB, OUT):
            out[k] = plan.fuse(a[k], b[k], lambda x, y, k=k: average(k, x, y, w), lambda y: y)
        else:
            out[k] = average(k, a[k], b[k], w)
    return out
