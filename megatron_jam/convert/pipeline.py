"""The conversion driver behind tools/convert_checkpoint.py: parents -> method -> checkpoint.

Memory: the parents are read one part (embedding, one layer, final) at a time,
and the writer streams each part's converted tensors into the checkpoint files
and drops them (`streaming.py`); the output model exists only on the meta
device. Peak resident memory is about one part of each parent plus one part of
the output, over the process's fixed cost (benchmarks/bench_convert_memory.py).
"""

import dataclasses
import os
from dataclasses import dataclass

import megatron_jam
from megatron_jam.convert.checkpoint import CheckpointWriter, ensure_single_rank
from megatron_jam.convert.common import OUT, ConvertError, parent_parts
from megatron_jam.convert.cross import cross_config, cross_part, new_part, new_parts
from megatron_jam.convert.readers import FAMILIES, open_parent, tokenizer_file
from megatron_jam.convert.uniform import uniform_config, uniform_part
from megatron_jam.convert.vocab import RULES, ParentTokenizer, VocabPlan, check_tokenizers, plan_vocab
from megatron_jam.convert.vq import extract_image_tokenizer
from megatron_jam.convert.width import width_config, width_part
from megatron_jam.models.config import ConfigError
from megatron_jam.models.config import JamGPTConfig
from megatron_jam.models.kinds import validate_model_parallel
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

METHODS = ("import", "uniform", "width", "cross")


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    method: str
    load: tuple[str, ...]
    """Parent folders: one for import, (llm, img) otherwise."""
    save: str
    llm_weight: float = 0.5
    width_init: str = "copy"
    cross_every: int = 2
    vocab_layout: str | None = None
    text_vocab_size: int | None = None
    seq_length: int | None = None
    bf16: bool = False
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    seed: int = 1234


def convert(opts: ConvertOptions) -> dict:
    """Run one conversion; returns the record written to conversion.json."""
    if opts.method not in METHODS:
        raise ConvertError(f"--method {opts.method!r} is not one of {METHODS}")
    want = 1 if opts.method == "import" else 2
    if len(opts.load) != want:
        raise ConvertError(f"--method {opts.method} takes {want} parent folder(s) in --load, got {len(opts.load)}")
    if not 0.0 <= opts.llm_weight <= 1.0:
        raise ConvertError(f"--llm-weight {opts.llm_weight} must be in [0, 1]")
    ensure_single_rank(opts.seed)
    parents = [open_parent(p) for p in opts.load]
    cfg, part_fn, record = _plan(opts, parents)
    try:
        validate_model_parallel(cfg, tp=opts.target_tensor_parallel_size, pp=opts.target_pipeline_parallel_size)
    except ConfigError as e:
        raise ConvertError(f"the converted model cannot run at the target layout: {e}") from e
    parts = parent_parts(parents[0].cfg) + (new_parts(cfg) if opts.method == "cross" else [])
    done = []
    with CheckpointWriter(cfg, opts.save, bf16=opts.bf16) as writer, _progress(parts) as bar:
        def convert_part(part):
            out = part_fn(part)
            done.append(part)
            bar.update()
            log_rank0(logger, "converted part %s (%d of %d)", part, len(done), len(parts))
            return out

        writer.write(parts, convert_part)
        # the VQ model stored with the parent (import) or the image parent (merges), if any
        record["image_tokenizer"] = extract_image_tokenizer(parents[-1], writer.tmp, opts.save)
        record["text_tokenizer_file"] = _carry_text_files(opts, parents, writer.tmp)
        writer.finish(record)
    log_rank0(logger, "wrote %s (%s, %s)", opts.save, opts.method, type(cfg).__name__)
    return record


def _plan(opts: ConvertOptions, parents: list):
    seq = opts.seq_length
    record = {"method": opts.method, "parents": [p.source for p in parents],
              "megatron_jam_version": megatron_jam.__version__}
    if opts.method == "import":
        (a,) = parents
        cfg = JamGPTConfig(parent=a.cfg, vocab_size=a.vocab_size, share_embeddings_and_output_weights=a.tied,
                           seq_length=seq or min(2048, a.cfg.max_position_embeddings))
        record |= {"vocab": {"rule": RULES["import"], "vocab_size": a.vocab_size},
                   "hf_config": a.hf_config, "text_tokenizer": a.tokenizer_identity()}
        return cfg, a.read, record
    a, b = parents
    layout = _layout(opts.vocab_layout)
    check_tokenizers(_tokenizer("LLM", a), _tokenizer("image model", b), layout, opts.method)
    if opts.method in ("uniform", "width"):
        _check_same_family(opts.method, a, b)
    plan = plan_vocab(a.vocab_size, b.vocab_size, layout, opts.text_vocab_size)
    seq = seq or min(2048, a.cfg.max_position_embeddings, b.cfg.max_position_embeddings)
    record |= {"vocab": plan.describe(opts.method)}
    tied = a.tied and b.tied
    cfg = {"cross": lambda: cross_config(a.cfg, b.cfg, plan, opts.cross_every, seq),
           "uniform": lambda: uniform_config(a.cfg, b.cfg, plan, tied, seq),
           "width": lambda: width_config(a.cfg, b.cfg, plan, tied, seq)}[opts.method]()
    plan = dataclasses.replace(plan, padded_rows=cfg.padded_vocab_size)  # fused tables are made padded
    if opts.method == "cross":
        record |= {"cross_every": opts.cross_every}
        return cfg, lambda part: new_part(cfg, part, opts.seed, opts.bf16) if isinstance(part, tuple) \
            else cross_part(a.read(part), b.read(part), plan), record
    record |= {"hf_config": _merge_base(a)}
    if opts.method == "uniform":
        record |= {"llm_weight": opts.llm_weight}
        return cfg, lambda part: uniform_part(*_pair(a, b, part, tied), plan, opts.llm_weight), record
    record |= {"width_init": opts.width_init}
    return cfg, lambda part: width_part(*_pair(a, b, part, tied), a.cfg, plan, opts.width_init), record


def _carry_text_files(opts: ConvertOptions, parents: list, folder: str) -> str | None:
    """The checkpoint's own vocabulary layout (--vocab-layout) and text tokenizer (the parents' copy that is the
    layout's, else the first parent's), so the tools and the export need neither flag
    (megatron_jam.data.run_files). Returns the tokenizer file copied, or None."""
    from megatron_jam.data.run_files import LAYOUT_FILE, copy_tokenizer, matching_tokenizer

    layout = _layout(opts.vocab_layout)
    if layout is not None:
        layout.to_json(os.path.join(folder, LAYOUT_FILE))
    found = [tokenizer_file(p.path) for p in parents]
    chosen = matching_tokenizer(found, layout) if layout is not None else next(filter(None, found), None)
    if chosen is None:
        log_rank0(logger, "no parent folder holds the text tokenizer%s: the tools will need --tokenizer-model",
                  " of --vocab-layout" if layout is not None else "")
        return None
    copy_tokenizer(chosen, folder)
    return chosen


def _check_same_family(method: str, a, b) -> None:
    """Uniform and width need one Hugging Face family (e.g. not Emu3 + Llama, whose bodies match);
    parents of different model families are left to `check_same_architecture`, which lists every field."""
    if a.cfg.family == b.cfg.family and a.hf_family != b.hf_family:
        raise ConvertError(f"--method {method} needs parents of one family: {a.config_file} is "
                           f"{a.hf_family!r}, {b.config_file} is {b.hf_family!r}")


def _tokenizer(who: str, parent) -> ParentTokenizer:
    """The parent's tokenizer for the checks: its file, else the record that holds its identity."""
    identity = parent.tokenizer_identity()
    where = tokenizer_file(parent.path) or (parent.config_file if identity else "")
    return ParentTokenizer(who=who, file=where, identity=identity)


def _merge_base(a) -> dict:
    """The HF config a merge records for export: the family's choice, else the token ids."""
    keep = getattr(FAMILIES.get(a.hf_family), "merge_base", None)
    if keep is not None:
        return keep(a.hf_config)
    return {k: v for k, v in a.hf_config.items() if k.endswith("token_id")} | {"model_type": a.cfg.family}


def _pair(a, b, part, tied: bool) -> tuple[dict, dict]:
    """Both parents' part; an untied result gets a tied parent's input embedding as its output rows."""
    sa, sb = a.read(part), b.read(part)
    if part == "final" and not tied:
        for reader, sd in ((a, sa), (b, sb)):
            if OUT not in sd:
                sd[OUT] = reader.output_rows()
    return sa, sb


def _layout(path: str | None):
    if path is None:
        return None
    from megatron_jam.data.vocab import VocabLayout

    return VocabLayout.from_json(path)


def _progress(parts: list):
    from megatron_jam.utils.progress import progress

    return progress(total=len(parts), desc="convert", unit="part", log_lines=False)  # each part is logged already


__all__ = ["ConvertOptions", "METHODS", "VocabPlan", "convert"]
