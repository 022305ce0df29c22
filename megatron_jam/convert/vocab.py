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

Parents with different text tokenizers (Llama-3 + Emu3-Gen) have no common
text rows: uniform and width are refused (`check_tokenizers`), and cross needs a
mixed layout (`megatron_jam.data.mixed_vocab`): rows [0, T) are the LLM's, each
row of the image part is the image parent row `image_parent_rows` names, and
appended special rows start at zero (`VocabPlan.img_ranges`).

The same rules apply to untied output embeddings. T and V come from
`--vocab-layout` (the dataset's PREFIX.vocab.json); without it, from
`--text-vocab-size`; without either, T is the LLM's row count and V the image
model's. LLM rows beyond T (often padding) are dropped and reported.
"""

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from torch import Tensor

from megatron_jam.convert.common import ConvertError

RULES = {
    "uniform": "rows [0, T): w*llm + (1-w)*img; rows [T, V): img",
    "width": "rows [0, T): [llm | img] on the hidden dim; rows [T, V): [img | img]",
    "cross": "shared embedding: rows [0, T) from the LLM input embedding, rows [T, V) from the image model",
    "import": "the parent's rows unchanged",
}
MIXED_RULE = ("shared embedding, mixed tokenizers: rows [0, T) from the LLM, the image part re-indexed from the "
              "image model (img_ranges: id, image-model row, count), appended special rows zero")


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
    img_ranges: tuple = ()
    """Mixed tokenizers (JAM-Cross only): (id, image-model row, count) ranges of the rows after T; rows
    [0, T) are the LLM's, rows no range covers are zero."""
    img_only: tuple = ()
    """Native layouts: the [start, stop) row ranges of the image codes, which only the image model's rows
    give (every other row is in both parents: Chameleon's codes sit at 4..8195, before its text); empty:
    [T, V), the appended layout's rule."""

    def describe(self, method: str) -> dict:
        rule = MIXED_RULE if self.img_ranges else RULES[method]
        if self.img_only:
            rule = rule.replace("rows [0, T)", "rows outside img_only").replace("rows [T, V)", "img_only rows")
        return asdict(self) | {"rule": rule, "llm_rows_dropped": max(0, self.llm_rows - self.both_rows)}

    def segments(self) -> list[tuple[int, int, bool]]:
        """(start, stop, in both parents) row ranges covering [0, V)."""
        out, at = [], 0
        for a, b in self.img_only or ((self.text_rows, self.vocab_size),):
            out += [(at, a, True)] if at < a else []
            out.append((a, b, False))
            at = b
        return out + ([(at, self.vocab_size, True)] if at < self.vocab_size else [])

    @property
    def both_rows(self) -> int:
        """Rows the LLM must have: up to the last row both parents give."""
        return max((b for _, b, both in self.segments() if both), default=0)

    def fuse(self, llm: Tensor, img: Tensor, both: Callable[[Tensor, Tensor], Tensor],
             img_only: Callable[[Tensor], Tensor], rows: int | None = None) -> Tensor:
        """Rows [0, T) from `both(llm[:T], img[:T])`, rows [T, V) from `img_only(img[T:V])`, then zero
        rows up to `rows` (the model's padded vocabulary). Row-wise rules, applied in slices of rows
        and written into one output: the only full-size tensor made is the result. `llm` and `img`
        are tensors or `readers.Rows` (tables still on disk, read a slice at a time)."""
        step = max(1, ROW_SLICE_ELEMENTS // max(1, llm[0].numel()))
        if self.img_ranges:
            return self._fuse_mixed(llm, img, img_only, rows, step)
        out = None
        for a, b, in_both in self.segments():
            for i in range(a, b, step):
                j = min(i + step, b)
                piece = both(llm[i:j], img[i:j]) if in_both else img_only(img[i:j])
                if out is None:
                    out = piece.new_zeros(max(rows or self.padded_rows, self.vocab_size), *piece.shape[1:])
                out[i:j] = piece
        return out

    def _fuse_mixed(self, llm, img, img_only, rows, step: int) -> Tensor:
        """Rows [0, T) the LLM's (JAM-Cross's rule: uniform and width never get a mixed plan), each image
        range from the image model's rows it names, the rest (appended specials, padding) zero."""
        first = llm[:1]
        out = first.new_zeros(max(rows or self.padded_rows, self.vocab_size), *first.shape[1:])
        for i in range(0, self.text_rows, step):
            out[i: min(i + step, self.text_rows)] = llm[i: min(i + step, self.text_rows)]
        for start, src, n in self.img_ranges:
            for i in range(0, n, step):
                j = min(i + step, n)
                out[start + i: start + j] = img_only(img[src + i: src + j])
        return out


ROW_SLICE_ELEMENTS = 1 << 22


def plan_vocab(llm_rows: int, img_rows: int, layout=None, text_vocab_size: int | None = None) -> VocabPlan:
    """The row plan for two parents; ConvertError when their vocabularies cannot be fused."""
    if layout is not None and layout.mixed:
        return _mixed_plan(llm_rows, img_rows, layout)
    if layout is not None and layout.native:
        return _native_plan(llm_rows, img_rows, layout)
    if layout is not None:
        t, v, source = layout.text_rows, layout.vocab_size, "--vocab-layout"
    elif text_vocab_size is not None:
        t, v, source = text_vocab_size, img_rows, "--text-vocab-size"
    elif llm_rows <= img_rows:
        t, v, source = llm_rows, img_rows, "parent row counts"
    else:
        raise ConvertError(f"the LLM has {llm_rows} embedding rows, more than the image model's {img_rows}: "
                           f"pass --vocab-layout (the dataset's PREFIX.vocab.json) to say which rows are text")
    _need_rows("text vocabularies differ: the LLM", llm_rows, t, f"the fused vocabulary ({source}) has {t} text tokens")
    _need_rows("the image model", img_rows, v, f"the fused vocabulary ({source}) needs {v} (text + special + image "
               f"tokens)")
    if not 0 < t <= v:
        raise ConvertError(f"text vocabulary size {t} must be in [1, {v}]")
    return VocabPlan(vocab_size=v, text_rows=t, llm_rows=llm_rows, img_rows=img_rows, source=source)


def _need_rows(parent: str, have: int, need: int, why: str) -> None:
    """ConvertError when a parent has fewer embedding rows than the fused vocabulary takes from it."""
    if have < need:
        raise ConvertError(f"{parent} has {have} embedding rows, but {why}")


def _native_plan(llm_rows: int, img_rows: int, layout) -> VocabPlan:
    """A parent-native layout (Emu3, Chameleon): the image-code rows (and appended special rows) from the image
    model, every other row (text, markers, reserved specials) in both parents."""
    from megatron_jam.data.native_vocab import ranges_of

    rows = layout.image_ids(np.arange(layout.codebook_size)).tolist() + list(layout.appended_specials.values())
    plan = VocabPlan(vocab_size=layout.vocab_size, text_rows=layout.text_rows, llm_rows=llm_rows, img_rows=img_rows,
                     source="--vocab-layout (native)", img_only=ranges_of(rows))
    _need_rows("text vocabularies differ: the LLM", llm_rows, plan.both_rows, f"the native --vocab-layout needs its "
               f"rows up to {plan.both_rows} (text and markers of the parents' common tokenizer)")
    _need_rows("the image model", img_rows, plan.vocab_size, f"the native --vocab-layout needs {plan.vocab_size} "
               f"(its vocabulary and any appended specials)")
    return plan


def _mixed_plan(llm_rows: int, img_rows: int, layout) -> VocabPlan:
    """Rows of a mixed layout: [0, T) from the LLM, the image part from the image model rows it names."""
    t, top = layout.text_vocab_size, max(src + n for _, src, n in layout.image_parent_rows)
    _need_rows("the LLM", llm_rows, t, f"the mixed --vocab-layout's text part (its tokenizer) has {t} ids")
    _need_rows("the image model", img_rows, top, f"the mixed --vocab-layout takes its row {top - 1} "
               f"(image_parent_rows)")
    return VocabPlan(vocab_size=layout.vocab_size, text_rows=t, llm_rows=llm_rows, img_rows=img_rows,
                     source="--vocab-layout (mixed)", img_ranges=layout.image_parent_rows)


@dataclass(frozen=True)
class ParentTokenizer:
    """A parent's text tokenizer as the converter sees it: who (for messages), its file and its identity."""

    who: str
    file: str
    identity: str

    def __str__(self) -> str:
        return f"{self.who} {self.file or '(no tokenizer file)'} ({self.identity or 'identity unknown'})"


def tokenizers_differ(a: ParentTokenizer, b: ParentTokenizer) -> bool:
    """Whether two parents' tokenizers are known to differ: identities of one kind that differ, or (a
    sentencepiece model against a tokenizer.json, which cannot be hashed alike) different vocabulary sizes."""
    if not (a.identity and b.identity) or a.identity == b.identity:
        return False
    if a.identity.split(":", 1)[0] == b.identity.split(":", 1)[0]:
        return True
    from megatron_jam.data.text_tokenizer import TextTokenizerError, load_text_tokenizer

    try:
        return load_text_tokenizer(a.file).vocab_size != load_text_tokenizer(b.file).vocab_size
    except (TextTokenizerError, OSError, RuntimeError):
        return False


def check_tokenizers(llm: ParentTokenizer, img: ParentTokenizer, layout=None, method: str = "cross") -> None:
    """Refuse what different tokenizers make meaningless: uniform and width always (eqs. 1 and 2 combine
    rows id by id), cross without a mixed layout; and a layout whose recorded tokenizers are not the parents'."""
    if layout is not None and layout.mixed:
        _check_mixed_layout(llm, img, layout, method)
        return
    if tokenizers_differ(llm, img):
        if method in ("uniform", "width"):
            how = "averages (eq. 1)" if method == "uniform" else "stacks (eq. 2)"
            raise ConvertError(f"--method {method} cannot fuse parents whose text tokenizers differ: {llm}, {img}; "
                               f"it {how} embedding rows id by id and row i means a different token in each; use "
                               f"--method cross with a mixed --vocab-layout (docs/real_parents.md)")
        raise ConvertError(f"the parents' text tokenizers differ ({llm}, {img}): --method cross needs a mixed "
                           f"--vocab-layout saying which rows come from which parent (tools/preprocess_interleaved.py "
                           f"--vocab-layout-kind mixed --image-parent-tokenizer IMG; docs/real_parents.md)")
    named = [(str(llm), llm.identity), (str(img), img.identity)]
    if layout is not None:
        named.append(("--vocab-layout text_tokenizer", layout.text_tokenizer))
    known = [(who, ident) for who, ident in named if ident]
    # Compare like with like: sentencepiece model hashes with each other, tokenizer.json with each other.
    for kind in {ident.split(":", 1)[0] for _, ident in known}:
        same_kind = [(who, ident) for who, ident in known if ident.startswith(kind + ":")]
        if len({ident for _, ident in same_kind}) > 1:
            detail = ", ".join(who if who.endswith(")") else f"{who}: {ident}" for who, ident in same_kind)
            raise ConvertError(f"the parents' text tokenizers differ ({detail})")


def _check_mixed_layout(llm: ParentTokenizer, img: ParentTokenizer, layout, method: str) -> None:
    """A mixed layout is JAM-Cross's, built from these two parents' tokenizers (where both sides record one)."""
    if method != "cross":
        raise ConvertError(f"--method {method} cannot use a mixed --vocab-layout (text ids of one tokenizer, image "
                           f"rows of another): only --method cross keeps both parents' rows apart")
    for parent, recorded, field in ((llm, layout.text_tokenizer, "text_tokenizer"),
                                    (img, layout.image_parent_tokenizer, "image_parent_tokenizer")):
        if parent.identity and recorded and parent.identity != recorded:
            raise ConvertError(f"the mixed --vocab-layout was built with {field} {recorded}, but {parent}")
