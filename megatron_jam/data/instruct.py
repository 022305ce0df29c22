"""Instruction-tuning documents: prompt/response turns stored with a per-sequence loss flag.

Why this storage: the loss must fall on response tokens only, the flag must
survive packing, CM3 masking and blending, and the shards must stay plain
Megatron multimodal datasets that every existing reader (Megatron-Core's
`IndexedDataset`, `tools/inspect_dataset.py`) opens unchanged. So a turn
boundary is also a sequence boundary, and one extra file next to the shards,
`PREFIX.loss_mask.npy`, holds one uint8 per stored sequence (1 = loss, 0 = no
loss). Alternatives rejected: a second indexed dataset with a per-token mask
(doubles the reads, two files to keep in step token by token); extra bits in
`sequence_modes` (changes the meaning of a field other readers compare with
`== MODE_IMAGE`). A prefix without the file trains on every token.

Token stream of an instruction document (the layout of
:mod:`megatron_jam.data.documents`, with turns): each turn's items become
segments; `<break>` goes between adjacent segments when one is an image and
belongs to the turn that *follows* it (predicting "an image starts now" is the
responder's decision); adjacent text of the same turn is joined; text of two
turns is never joined (the turn boundary becomes a sequence boundary); `<eos>`
ends the document and belongs to the last turn. Text is encoded as given, so
put any separator (" ", "\\n", "Answer:") in the strings themselves.

Accepted records (JSON Lines)::

    {"prompt": "How do I ...?", "response": [{"text": "Like this:"}, {"image": "a.png"}]}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": [...]}]}

`prompt`/`response` and `content` are a string or a list of content items
(`text`, `image`, `image_tokens`, as in preprocessing). `turns` is accepted as
a synonym of `messages`. Loss roles default to {"assistant", "response"}.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.data.documents import IMAGE, TEXT, RejectedDocument, content_items
from megatron_jam.data.indexed_builder import MODE_IMAGE, MODE_TEXT
from megatron_jam.data.vocab import VocabLayout

LOSS_MASK_SUFFIX = ".loss_mask.npy"
DEFAULT_LOSS_ROLES = ("assistant", "response")


def loss_mask_path(prefix: str) -> str:
    """Where the per-sequence loss flags of dataset `prefix` live."""
    return prefix + LOSS_MASK_SUFFIX


def load_sequence_loss(prefix: str, num_sequences: int) -> Optional[np.ndarray]:
    """Per-sequence loss flags of `prefix` (uint8), or None when the dataset has none (all loss)."""
    path = loss_mask_path(prefix)
    if not os.path.exists(path):
        return None
    flags = np.load(path, mmap_mode="r")
    if flags.ndim != 1 or flags.shape[0] != num_sequences:
        raise ValueError(f"{path}: {flags.shape} loss flags for a dataset of {num_sequences} sequences")
    return flags


def _items(value: Any, where: str) -> List[Tuple[str, Any]]:
    if isinstance(value, str):
        return [(TEXT, value)]
    if isinstance(value, list):
        return content_items({"content": value}, ())
    raise RejectedDocument("malformed_json", f"{where} must be a string or a list of content items")


def instruction_turns(record: Any, loss_roles: Iterable[str] = DEFAULT_LOSS_ROLES
                      ) -> List[Tuple[bool, List[Tuple[str, Any]]]]:
    """[(has_loss, content items)] per turn of a parsed JSON record (see module docstring)."""
    if not isinstance(record, dict):
        raise RejectedDocument("malformed_json", "expected a JSON object")
    roles = set(loss_roles)
    if "prompt" in record or "response" in record:
        if "prompt" not in record or "response" not in record:
            raise RejectedDocument("malformed_json", "a prompt/response record needs both keys")
        return [(False, _items(record["prompt"], "prompt")), (True, _items(record["response"], "response"))]
    messages = record.get("messages", record.get("turns"))
    if not isinstance(messages, list) or not messages:
        raise RejectedDocument("missing_turns", "no prompt/response pair and no non-empty messages list")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RejectedDocument("malformed_json", f"messages[{i}] needs 'role' and 'content'")
        turns.append((msg["role"] in roles, _items(msg["content"], f"messages[{i}].content")))
    if not any(loss for loss, _ in turns):
        raise RejectedDocument("no_loss_turn", f"no turn has a loss role ({sorted(roles)})")
    return turns


def build_instruct_sequences(segments: Sequence[Tuple[bool, str, np.ndarray]], layout: VocabLayout
                             ) -> Tuple[List[np.ndarray], List[int], List[int]]:
    """[(has_loss, TEXT|IMAGE, ids)] in order -> stored sequences, modes and loss flags."""
    merged: List[List[Any]] = []
    for loss, kind, ids in segments:
        if kind == TEXT and ids.size == 0:
            continue
        if kind == TEXT and merged and merged[-1][1] == TEXT and merged[-1][0] == loss:
            merged[-1][2] = np.concatenate([merged[-1][2], ids])
        else:
            merged.append([loss, kind, ids])
    if not merged:
        raise RejectedDocument("empty_document", "no text tokens and no images")
    sequences: List[np.ndarray] = []
    modes: List[int] = []
    flags: List[int] = []
    run: List[np.ndarray] = []
    run_loss: Optional[bool] = None

    def flush() -> None:
        nonlocal run, run_loss
        if run:
            sequences.append(np.concatenate(run))
            modes.append(MODE_TEXT)
            flags.append(int(run_loss))
        run, run_loss = [], None

    for i, (loss, kind, ids) in enumerate(merged):
        if run_loss is not None and run_loss != loss:
            flush()
        if layout.format.uses_break and i > 0 and (kind == IMAGE or merged[i - 1][1] == IMAGE):
            run.append(np.array([layout.break_id]))  # formats with markers (Emu3) need no <break>
            run_loss = loss
        if kind == IMAGE:
            flush()
            sequences.append(ids)
            modes.append(MODE_IMAGE)
            flags.append(int(loss))
        else:
            run.append(ids)
            run_loss = loss
    last_loss = merged[-1][0]
    if run_loss is not None and run_loss != last_loss:
        flush()
    run.append(np.array([layout.eos_id]))
    run_loss = last_loss
    flush()
    return sequences, modes, flags
