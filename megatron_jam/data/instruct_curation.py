"""The paper's wikiHow curation (section 3.1.1), as options for a user's own instruction data.

What the paper did to its 3,000 wikiHow articles, and the option that does it here
(`tools/preprocess_instruct.py`):

- "sampling only those with a [community rating] greater than 90/100":
  `--min-rating X --rating-field rating` keeps a record whose field is a number
  >= X (so `--min-rating 91` for "greater than 90" on integer scores); a
  record below it, or without a numeric rating, is a reject (`low_rating`,
  `no_rating`) with its line in PREFIX.rejects.jsonl;
- "we restrict the number of images as 3 per sample, to fit our 4096 context
  length": `--max-images 3` keeps the first 3 images of a record and drops the
  others (their text stays; counted), or with `--too-many-images reject`
  rejects the record (`too_many_images`); `--max-document-tokens 4096` rejects
  a record still longer than the context (`too_long`), so no training sample
  is cut;
- "we modify the phrase 'This article...' with 'The following answer'":
  `--rewrite-this-article` replaces "This article" / "this article" in every
  text item (counted per replacement and per record).

Curation rejects are intended, so they are counted apart from broken input
(`FILTER_REASONS`): `--max-reject-fraction` bounds only the latter.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
from typing import Any, List, Optional, Tuple

from megatron_jam.data.documents import IMAGE, IMAGE_TOKENS, TEXT, RejectedDocument

FILTER_REASONS = ("low_rating", "no_rating", "too_many_images", "too_long")
"""Reject reasons of the curation filters (wanted), not of bad input."""

_THIS_ARTICLE = re.compile(r"\b([Tt])his article\b")

Turns = List[Tuple[bool, List[Tuple[str, Any]]]]


@dataclasses.dataclass(kw_only=True)
class Curation:
    """The curation options of one preprocessing run (all off by default)."""

    min_rating: Optional[float] = None
    """Keep records whose `rating_field` is a number >= this; None = no rating filter."""
    rating_field: str = "rating"
    """The JSON field holding a record's rating (e.g. wikiHow's community score out of 100)."""
    max_images: Optional[int] = None
    """At most this many images per record; None = no limit."""
    too_many_images: str = "drop"
    """"drop": keep the first `max_images` images; "reject": reject the record."""
    rewrite_this_article: bool = False
    """Replace "This article" with "The following answer" in every text item."""
    max_document_tokens: Optional[int] = None
    """Reject a record that encodes to more tokens than this (the training context); None = no limit."""

    def __post_init__(self) -> None:
        if self.too_many_images not in ("drop", "reject"):
            raise ValueError(f"--too-many-images {self.too_many_images}: expected drop or reject")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"--max-images {self.max_images}: expected 0 or more")


def add_curation_args(p: argparse.ArgumentParser) -> None:
    """The curation flags of tools/preprocess_instruct.py (module docstring)."""
    g = p.add_argument_group("curation (the paper's wikiHow recipe, section 3.1.1; all off by default)")
    g.add_argument("--min-rating", type=float, default=None,
                   help="keep records whose --rating-field is a number >= this (reject the others: low_rating, "
                        "no_rating); the paper kept wikiHow articles rated above 90/100")
    g.add_argument("--rating-field", default="rating", help="the JSON field holding a record's rating")
    g.add_argument("--max-images", type=int, default=None,
                   help="at most this many images per record (the paper: 3, to fit 4,096 tokens); the first ones "
                        "are kept, see --too-many-images")
    g.add_argument("--too-many-images", choices=["drop", "reject"], default="drop",
                   help="past --max-images: drop the extra images (their text stays) or reject the record")
    g.add_argument("--max-document-tokens", type=int, default=None,
                   help="reject a record longer than this many tokens once encoded (too_long): use the training "
                        "--seq-length + 1 so that no sample is cut")
    g.add_argument("--rewrite-this-article", action="store_true",
                   help='replace "This article" with "The following answer" in every text (as the paper did)')


def curation_from_args(args: argparse.Namespace) -> Curation:
    return Curation(min_rating=args.min_rating, rating_field=args.rating_field, max_images=args.max_images,
                    too_many_images=args.too_many_images, rewrite_this_article=args.rewrite_this_article,
                    max_document_tokens=args.max_document_tokens)


class Curator:
    """Applies a `Curation` to parsed records; `turns` returns what it changed in that record (a Counter
    the caller adds to its totals only for records it keeps, so a later reject is not counted twice)."""

    def __init__(self, curation: Curation) -> None:
        self.curation = curation

    def check_rating(self, record: Any) -> None:
        """Raise a `RejectedDocument` for a record below --min-rating (or without a numeric rating)."""
        c = self.curation
        if c.min_rating is None:
            return
        value = record.get(c.rating_field) if isinstance(record, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RejectedDocument("no_rating", f"no numeric {c.rating_field!r} field (--min-rating {c.min_rating})")
        if value < c.min_rating:
            raise RejectedDocument("low_rating", f"{c.rating_field} {value} < --min-rating {c.min_rating}")

    def turns(self, turns: Turns) -> Tuple[Turns, collections.Counter]:
        """(the turns with the image limit and the rewrite applied, what changed)."""
        counts: collections.Counter = collections.Counter()
        if self.curation.max_images is not None:
            turns = self._limit_images(turns, counts)
        if self.curation.rewrite_this_article:
            turns = self._rewrite(turns, counts)
        return turns, counts

    def check_length(self, num_tokens: int) -> None:
        """Raise a `RejectedDocument` for an encoded record longer than --max-document-tokens."""
        limit = self.curation.max_document_tokens
        if limit is not None and num_tokens > limit:
            raise RejectedDocument("too_long", f"{num_tokens} tokens > --max-document-tokens {limit}")

    def _limit_images(self, turns: Turns, counts: collections.Counter) -> Turns:
        limit = self.curation.max_images
        images = sum(kind in (IMAGE, IMAGE_TOKENS) for _, items in turns for kind, _ in items)
        if images <= limit:
            return turns
        if self.curation.too_many_images == "reject":
            raise RejectedDocument("too_many_images", f"{images} images > --max-images {limit}")
        kept, out = 0, []
        for loss, items in turns:
            keep = []
            for kind, value in items:
                if kind in (IMAGE, IMAGE_TOKENS):
                    kept += 1
                    if kept > limit:
                        continue
                keep.append((kind, value))
            out.append((loss, keep))
        counts["images_dropped"] += images - limit
        counts["documents_with_images_dropped"] += 1
        return out

    def _rewrite(self, turns: Turns, counts: collections.Counter) -> Turns:
        out, total = [], 0
        for loss, items in turns:
            keep = []
            for kind, value in items:
                if kind == TEXT:
                    value, n = _THIS_ARTICLE.subn(lambda m: "The following answer" if m.group(1) == "T"
                                                  else "the following answer", value)
                    total += n
                keep.append((kind, value))
            out.append((loss, keep))
        if total:
            counts["this_article_rewrites"] += total
            counts["documents_rewritten"] += 1
        return out
