"""Loading a checkpoint for generation, and the checks that must pass before any token is generated.

Why here: the generator meets four independently produced artefacts (the
checkpoint, its vocabulary layout, the text tokenizer (sentencepiece or
Hugging Face), the VQ tokenizer) and a mismatch between any two gives plausible-looking garbage,
not an error. Every check raises `GenerationSetupError` naming both sides.

The model is built and loaded exactly as the evaluator does it
(`build_model_chunks` + `dist_checkpointing`), for a converted checkpoint
(`tools/convert_checkpoint.py`) or a trained one
(`latest_checkpointed_iteration.txt` + `iter_0000060/`-style folders, weights only).
"""

import hashlib
import json
import logging
import os

from megatron_jam.data.vocab import VocabLayout, VocabLayoutError
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

LAYOUT_FILES = ("vocab_layout.json", "vocab.json")


class GenerationSetupError(ValueError):
    """The inputs of a generation run do not fit together; the message names both sides."""


def file_identity(path: str, kind: str) -> str:
    """'kind:sha256:<16 hex>' of a file (as `VocabLayout.text_tokenizer` records it)."""
    with open(path, "rb") as f:
        return f"{kind}:sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}"


def resolve_layout(load: str, path: str | None) -> VocabLayout:
    """`--vocab-layout PATH`, else a layout file saved in the checkpoint folder."""
    if path is None:
        found = [os.path.join(load, f) for f in LAYOUT_FILES if os.path.exists(os.path.join(load, f))]
        if not found:
            raise GenerationSetupError(f"no vocabulary layout: pass --vocab-layout (the dataset's PREFIX.vocab.json) "
                                       f"or put one in {load} as {' or '.join(LAYOUT_FILES)}")
        path = found[0]
    try:
        return VocabLayout.from_json(path)
    except (OSError, VocabLayoutError) as e:
        raise GenerationSetupError(f"vocabulary layout {path}: {e}") from e


def check_checkpoint_layout(load: str, cfg, layout: VocabLayout) -> None:
    """The checkpoint's vocabulary (model_config.json, conversion.json) against the layout.

    A converted checkpoint has exactly the layout's rows. A model trained from a model config
    (`--model-config`, no conversion.json) may have more rows than the data uses (the trainer accepts
    vocab_size >= the layout's, as Megatron pads); the rows past the layout are never sampled."""
    record = os.path.join(load, "conversion.json")
    converted = os.path.exists(record)
    if layout.vocab_size > cfg.vocab_size or (converted and layout.vocab_size != cfg.vocab_size):
        raise GenerationSetupError(
            f"the vocabulary layout has {layout.vocab_size} ids but the checkpoint {load} has vocab_size="
            f"{cfg.vocab_size}: the layout differs from the one the model was converted/trained with")
    if converted:
        with open(record) as f:
            text_rows = (json.load(f).get("vocab") or {}).get("text_rows")
        # a native layout's parent rows may all be "text rows" of a merge (Emu3 uniform / width: both parents
        # hold every row, codes included), or only those before the codes (cross with --text-vocab-size)
        allowed = {layout.text_rows} | ({layout.parent_vocab_size} if layout.native else set())
        if text_rows is not None and text_rows not in allowed:
            raise GenerationSetupError(
                f"the checkpoint {load} was converted with {text_rows} text rows (conversion.json) but the "
                f"vocabulary layout has {layout.text_rows} (text_vocab_size={layout.text_vocab_size})")


def load_tokenizers(args, layout: VocabLayout) -> tuple:
    """(text tokenizer or None, VQ tokenizer or None) of a generation tool: `--tokenizer-model` /
    `--image-tokenizer` when given (a mismatch with the layout is an error), else the copies the `--load`
    folder carries (`tokenizer/`, `image_tokenizer/`; megatron_jam.data.run_files)."""
    from megatron_jam.data.run_files import run_image_tokenizer, run_tokenizer

    def text_tokenizer(path, given):
        return load_text_tokenizer(path, layout, args.tokenizer_type if given else None)  # a copy: its own kind

    text = _given_or_carried("--tokenizer-model", args.tokenizer_model, run_tokenizer(args.load), text_tokenizer)
    vq = _given_or_carried("--image-tokenizer", args.image_tokenizer, run_image_tokenizer(args.load),
                           lambda path, given: load_image_tokenizer(path, layout))
    return text, vq


def _given_or_carried(flag: str, given: str | None, carried: str | None, load):
    """`load(given)`, whose errors stop the run; else `load(carried)`, left out with a warning when the copy does
    not fit the layout: a default must not turn a run that needs no such tokenizer into an error."""
    if given is not None:
        return load(given, True)
    if carried is None:
        return None
    try:
        found = load(carried, False)
    except GenerationSetupError as e:
        log_rank0(logger, "%s: the copy in --load does not fit, not used: %s", flag, e, level=logging.WARNING)
        return None
    log_rank0(logger, "%s %s (carried by --load)", flag, carried)
    return found


def load_text_tokenizer(path: str, layout: VocabLayout, tokenizer_type: str | None = None):
    """The text tokenizer at `path` (`megatron_jam.data.text_tokenizer`; sentencepiece or Hugging Face, the
    type inferred when None), which must be the layout's: same vocabulary size, same identity."""
    from megatron_jam.data.text_tokenizer import TextTokenizerError, check_layout
    from megatron_jam.data.text_tokenizer import load_text_tokenizer as load

    try:
        tokenizer = load(path, tokenizer_type)
        check_layout(tokenizer, layout)
    except TextTokenizerError as e:
        raise GenerationSetupError(str(e)) from e
    return tokenizer


def load_image_tokenizer(path: str, layout: VocabLayout):
    """The VQ tokenizer, checked against the layout's codebook, tokens per image (not for an Emu3 VQ with a
    format whose grid is in the tokens: each image is decoded on its own grid) and identity."""
    from megatron_jam.data.image_tokenizer import VQImageTokenizer

    try:
        vq = VQImageTokenizer(path)
    except (OSError, ValueError) as e:
        raise GenerationSetupError(str(e)) from e
    checks = [("codebook size", vq.codebook_size, layout.codebook_size)]
    if layout.format.name == "ours" or getattr(vq, "kind", "") != "emu3_vqgan":  # Emu3's VQ decodes any grid
        checks.append(("tokens per image", vq.tokens_per_image, layout.tokens_per_image))
    for what, mine, theirs in checks:
        if mine != theirs:
            raise GenerationSetupError(f"--image-tokenizer {path}: {what} {mine} but the model's vocabulary "
                                       f"layout has {theirs}")
    if layout.image_tokenizer and layout.image_tokenizer != vq.identity:
        raise GenerationSetupError(f"--image-tokenizer {path} is {vq.identity}, but the vocabulary layout was "
                                   f"built with {layout.image_tokenizer}")
    return vq


def load_model(load: str, tp: int = 1, pp: int = 1, iteration: int | None = None):
    """(model, cfg): the whole model on this rank's TP shard, eval mode, weights from `load` (a training
    folder's latest iteration, or `iteration`)."""
    from megatron_jam.models.kinds import load_model_config, model_class, validate_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    if pp != 1:
        raise GenerationSetupError(f"pipeline-model-parallel-size={pp}: generation needs the whole model on one "
                                   "stage (use --tensor-model-parallel-size to split a large model)")
    cfg = load_model_config(load)
    validate_model_parallel(cfg, tp=tp, pp=1)
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp, 1, perform_initialization=False),
                                wrap_ddp=False)
    from megatron_jam.convert.checkpoint import load_checkpoint

    load_checkpoint(chunks, load, iteration)  # converted or trained (latest complete iteration), weights only
    log_rank0(logger, "loaded %s (%s) at TP=%d", load, type(cfg).__name__, tp)
    return chunks[0].eval(), cfg
