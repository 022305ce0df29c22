"""What a run folder carries besides its weights, so that it is all a later tool needs.

A training run (`--save RUN`) and a converted checkpoint hold, next to the
model::

    RUN/vocab_layout.json     the vocabulary layout the model was trained / converted with
    RUN/tokenizer/            the text tokenizer: tokenizer.model (sentencepiece), or tokenizer.json
                              (+ tokenizer_config.json, special_tokens_map.json: Hugging Face)
    RUN/image_tokenizer/      the VQ image tokenizer (a transformers folder)

Why copies and not recorded paths: a run outlives the scratch folders it was
made from, and the tools (`generate_interleaved.py --load RUN`,
`evaluate.py`, the Hugging Face export) then need no flag to find them. The
copies are checked, not trusted: a tokenizer is carried only when its
identity (the hash `VocabLayout.text_tokenizer` / `image_tokenizer` records)
is the layout's, and the tools still refuse a given `--tokenizer-model` whose
hash differs (`megatron_jam.inference.loading`).

Where the files come from: a converted checkpoint takes them from its parents'
folders (`megatron_jam.convert.pipeline`); a training run from `--load` (a
converted or earlier run) or else from what preprocessing recorded in
`PREFIX.stats.json` (`tokenizer_model`, `image_tokenizer`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable

from megatron_jam.data.integrity import CHECKPOINT_LAYOUT_FILES
from megatron_jam.data.text_tokenizer import (
    HF_CONFIG_FILES,
    HF_TOKENIZER_FILE,
    SENTENCEPIECE,
    TextTokenizerError,
    infer_tokenizer_type,
    load_text_tokenizer,
)
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

LAYOUT_FILE = CHECKPOINT_LAYOUT_FILES[0]
TOKENIZER_DIR = "tokenizer"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
SENTENCEPIECE_FILE = "tokenizer.model"
STATS_SUFFIX = ".stats.json"
_SHARD_SUFFIX = re.compile(r"_\d{5}$")


def run_tokenizer(folder: str | None) -> str | None:
    """The `--tokenizer-model` path of the text tokenizer a run folder carries, or None."""
    if not folder:
        return None
    inner = os.path.join(folder, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(inner, SENTENCEPIECE_FILE)):
        return os.path.join(inner, SENTENCEPIECE_FILE)
    return inner if os.path.isfile(os.path.join(inner, HF_TOKENIZER_FILE)) else None


def run_image_tokenizer(folder: str | None) -> str | None:
    """The `--image-tokenizer` folder a run folder carries, or None."""
    inner = os.path.join(folder, IMAGE_TOKENIZER_DIR) if folder else ""
    return inner if inner and os.path.isfile(os.path.join(inner, "config.json")) else None


def tokenizer_files(path: str) -> list[tuple[str, str]]:
    """(source file, name in RUN/tokenizer/) of the tokenizer at `path` (a .model file, a tokenizer.json or
    its folder): the file itself, and the Hugging Face config files beside it (eos / bos / pad names,
    the tokenizer class), which the ids do not depend on but `AutoTokenizer` and the export read."""
    kind = infer_tokenizer_type(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    main = os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path
    files = [(main, SENTENCEPIECE_FILE if kind == SENTENCEPIECE else HF_TOKENIZER_FILE)]
    return files + [(os.path.join(folder, n), n) for n in HF_CONFIG_FILES if os.path.isfile(os.path.join(folder, n))]


def copy_tokenizer(path: str, folder: str) -> str:
    """Copy the tokenizer at `path` into `folder`/tokenizer/ (under a temporary name, then renamed);
    returns the copy's `--tokenizer-model` path."""
    out = os.path.join(folder, TOKENIZER_DIR)
    _publish_copy(out, lambda tmp: [shutil.copyfile(src, os.path.join(tmp, name))
                                    for src, name in tokenizer_files(path)])
    return run_tokenizer(folder)


def copy_image_tokenizer(path: str, folder: str) -> str:
    """Copy the VQ folder `path` byte for byte into `folder`/image_tokenizer/ (its identity is a hash of its
    files, so a copy keeps it)."""
    out = os.path.join(folder, IMAGE_TOKENIZER_DIR)
    _publish_copy(out, lambda tmp: [shutil.copyfile(os.path.join(path, f), os.path.join(tmp, f))
                                    for f in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, f))])
    return out


def _publish_copy(out: str, fill) -> None:
    """`fill(tmp)` writes a folder that appears at `out` whole (a stopped copy leaves no half folder)."""
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recorded_tokenizers(prefix: str) -> dict:
    """What preprocessing recorded in `PREFIX.stats.json` (a shard P_00003 falls back to P.stats.json):
    {"tokenizer_model": path, "image_tokenizer": path}, either absent; {} without a readable record."""
    for candidate in (prefix, _SHARD_SUFFIX.sub("", prefix)):
        try:
            with open(candidate + STATS_SUFFIX, encoding="utf-8") as f:
                stats = json.load(f)
        except (OSError, ValueError):
            continue
        return {k: stats[k] for k in ("tokenizer_model", "image_tokenizer") if isinstance(stats.get(k), str)}
    return {}


def matching_tokenizer(candidates: Iterable[str | None], layout) -> str | None:
    """The first candidate text tokenizer that is the layout's (same size, same identity when recorded)."""
    from megatron_jam.data.text_tokenizer import check_layout

    for path in candidates:
        if not path or not os.path.exists(path):
            continue
        try:
            check_layout(load_text_tokenizer(path), layout)
        except TextTokenizerError as e:
            log_rank0(logger, "not carried: %s", e)
            continue
        return path
    return None


def image_tokenizer_identity(path: str) -> str:
    """The identity `VQImageTokenizer` gives the folder (model_type + hash of config and weights), without
    loading the model."""
    from megatron_jam.data.image_tokenizer import folder_identity

    return folder_identity(path)


def matching_image_tokenizer(candidates: Iterable[str | None], layout) -> str | None:
    """The first candidate VQ folder whose identity is the layout's (any, when the layout records none)."""
    for path in candidates:
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            continue
        try:
            identity = image_tokenizer_identity(path)
        except (OSError, ValueError) as e:
            log_rank0(logger, "not carried: --image-tokenizer %s (%s)", path, e)
            continue
        if not layout.image_tokenizer or identity == layout.image_tokenizer:
            return path
        log_rank0(logger, "not carried: %s is %s, but the vocabulary layout was built with %s", path, identity,
                  layout.image_tokenizer)
    return None


def carry_run_files(save: str, layout, load: str | None = None, prefixes: Iterable[str] = ()) -> None:
    """Make `save` self-contained for `layout` (copied once: what the folder holds already stays): the text
    and image tokenizers from `load`, else from the data prefixes' preprocessing records."""
    records = [recorded_tokenizers(p) for p in prefixes]
    if run_tokenizer(save) is None:
        text = matching_tokenizer([run_tokenizer(load)] + [r.get("tokenizer_model") for r in records], layout)
        if text is None:
            log_rank0(logger, "no text tokenizer of the layout found (--load, PREFIX.stats.json): %s has none; "
                      "the tools will need --tokenizer-model", save)
        else:
            log_rank0(logger, "carried the text tokenizer %s into %s", text, copy_tokenizer(text, save))
    if run_image_tokenizer(save) is None:
        recorded = [_vq_folder(r.get("image_tokenizer")) for r in records]
        vq = matching_image_tokenizer([run_image_tokenizer(load)] + recorded, layout)
        if vq is not None:
            log_rank0(logger, "carried the image tokenizer %s into %s", vq, copy_image_tokenizer(vq, save))


def _vq_folder(path: str | None) -> str | None:
    """A recorded --image-tokenizer: the VQ folder itself, or a converted checkpoint holding image_tokenizer/."""
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        return run_image_tokenizer(path)
    return path
