"""Which embedding rows of the fused vocabulary come from which parent.

The fused vocabulary (megatron_jam.data.vocab.VocabLayout) is text ids
[0, T), then the special tokens (`<break>`, `<eos>`, `<mask>`, `<eos_span>`,
CM3 sentinels), then the image codes, V rows in all. The image-text parent
(CM3leon-style) was trained on this layout and has all V rows; the text LLM
has only the T text rows. So, per method:

- uniform: rows [0, T) = w * llm + (1 - w) * img; rows [T, V) = img's rows.
- width:   rows [0, T) = [llm | img] (hidden concatenation); rows [T, V) =
  [img | img] (the LLM has no such row, so its half takes the image row too).
- cross:   one shared embedding, rows [0, T) from the LLM, rows [T, V) from
  the image model (paper section 2.1.3).
- import:  the parent's rows, unchanged.

The same rules apply to untied output embeddings. T and V come from
`--vocab-layout` (the dataset's PREFIX.vocab.json); without it, from
`--text-vocab-size`; without either, T is the LLM's row count and V the image
model's. LLM rows beyond T (often padding) are dropped and reported.
"""

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from megatron_jam.convert.common import ConvertError

RULES = {
    "uniform": "rows [0, T): w*llm + (1-w)*img; rows [T, V): img",
    "width": "rows [0, T): [llm | img] on the hidden dim; rows [T, V): [img | img]",
    "cross": "shared embedding: rows [0, T) from the LLM input embedding, rows [T, V) from the image model",
    "import": "the parent's rows unchanged",
}


@dataclass(frozen=True)
class VocabPlan:
    """Fused vocabulary rows: [0, text_rows) exist in both parents, [text_rows, vocab_size) only in img."""

    vocab_size: int
    text_rows: int
    llm_rows: int
    img_rows: int
    source: str
    padded_rows: int = 0
    """Rows of the model's padded vocabulary (fused tables are made this tall, zero-filled); 0: V."""

    def describe(self, method: str) -> dict:
        return asdict(self) | {"rule": RULES[method], "llm_rows_dropped": max(0, self.llm_rows - self.text_rows)}

    def fuse(self, llm: Tensor, img: Tensor, both: Callable[[Tensor, Tensor], Tensor],
             img_only: Callable[[Tensor], Tensor], rows: int | None = None) -> Tensor:
        """Rows [0, T) from `both(llm[:T], img[:T])`, rows [T, V) from `img_only(img[T:V])`, then zero
        rows up to `rows` (the model's padded vocabulary). Row-wise rules, applied in slices of rows
        and written into one output: the only full-size tensor made is the result. `llm` and `img`
        are tensors or `readers.Rows` (tables still on disk, read a slice at a time)."""
        t, v = self.text_rows, self.vocab_size
        step = max(1, ROW_SLICE_ELEMENTS // max(1, llm[0].numel()))
        first = both(llm[: min(step, t)], img[: min(step, t)])
        out = first.new_zeros(max(rows or self.padded_rows, v), *first.shape[1:])
        out[: first.shape[0]] = first
        for i in range(step, t, step):
            out[i: min(i + step, t)] = both(llm[i: min(i + step, t)], img[i: min(i + step, t)])
        for i in range(t, v, step):
            out[i: min(i + step, v)] = img_only(img[i: min(i + step, v)])
        return out


ROW_SLICE_ELEMENTS = 1 << 22


def plan_vocab(llm_rows: int, img_rows: int, layout=None, text_vocab_size: int | None = None) -> VocabPlan:
    """The row plan for two parents; ConvertError when their vocabularies cannot be fused."""
    if layout is not None:
        t, v, source = layout.text_rows, layout.vocab_size, "--vocab-layout"  # native: rows before the codes
    elif text_vocab_size is not None:
        t, v, source = text_vocab_size, img_rows, "--text-vocab-size"
    elif llm_rows <= img_rows:
        t, v, source = llm_rows, img_rows, "parent row counts"
    else:
        raise ConvertError(f"the LLM has {llm_rows} embedding rows, more than the image model's {img_rows}: "
                           f"pass --vocab-layout (the dataset's PREFIX.vocab.json) to say which rows are text")
    if llm_rows < t:
        raise ConvertError(f"text vocabularies differ: the LLM has {llm_rows} embedding rows, but the fused "
                           f"vocabulary ({source}) has {t} text tokens")
    if img_rows < v:
        raise ConvertError(f"the image model has {img_rows} embedding rows, but the fused vocabulary ({source}) "
                           f"needs {v} (text + special + image tokens)")
    if not 0 < t <= v:
        raise ConvertError(f"text vocabulary size {t} must be in [1, {v}]")
    return VocabPlan(vocab_size=v, text_rows=t, llm_rows=llm_rows, img_rows=img_rows, source=source)


def check_tokenizers(llm_id: str, img_id: str, layout=None) -> None:
    """Both parents (and the layout, if given) must use the same text tokenizer, where each says which."""
    named = [("LLM folder", llm_id), ("image-model folder", img_id)]
    if layout is not None:
        named.append(("--vocab-layout text_tokenizer", layout.text_tokenizer))
    known = [(who, ident) for who, ident in named if ident]
    # Compare like with like: sentencepiece model hashes with each other, tokenizer.json with each other.
    for kind in {ident.split(":", 1)[0] for _, ident in known}:
        same_kind = [(who, ident) for who, ident in known if ident.startswith(kind + ":")]
        if len({ident for _, ident in same_kind}) > 1:
            detail = ", ".join(f"{who}: {ident}" for who, ident in same_kind)
            raise ConvertError(f"the parents' text tokenizers differ ({detail})")
