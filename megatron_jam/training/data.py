"""Where the trainer's micro-batches come from: Megatron indexed shards (`--data-path`) or `--mock-data`.

Both sources answer `microbatch(first_sample_index, micro_batch_size)` with the
batch dict of the schedules (tokens, labels, loss_mask, position_ids,
modality), and a sample is a pure function of its index, so the consumed-sample
count saved in a checkpoint is the whole data position. Shards go through
`megatron_jam.data.cm3_dataset.build_train_valid_test_datasets` (Megatron's
blend syntax, splits, on-disk index cache, CM3 objective, retrieval).
Validation sets: the blend's own valid split, plus any named
`--valid-data-path NAME=PREFIX` sets (for example `text=wiki image=coco`),
each reported separately, scored per document without CM3 as
tools/evaluate.py scores them (`megatron_jam.evaluation.DocumentValidation`),
or with `--cm3-validation` as CM3 samples of the training objective.
"""

import os

import torch

from megatron_jam.models.config import ConfigError
from megatron_jam.training.mock_data import MockInterleavedData
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


class DatasetSource:
    """Micro-batches of a map-style dataset of sample dicts."""

    def __init__(self, dataset, name: str):
        if dataset is None or len(dataset) == 0:
            raise ConfigError(f"data set {name!r} is empty (check --split and the prefix)")
        self.dataset, self.name = dataset, name

    def microbatch(self, first_index: int, micro_batch_size: int) -> dict:
        samples = [self.dataset[(first_index + i) % len(self.dataset)] for i in range(micro_batch_size)]
        return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids",
                                                                 "modality")}


def _every_rank() -> bool:
    """Every rank reads its own micro-batches (Megatron-LM instead broadcasts from TP rank 0);
    the index cache is still built once, on rank 0, by Megatron's builder."""
    return True


def _cm3(args):
    from megatron_jam.data.cm3 import CM3Config

    if args.no_cm3:
        return None
    return CM3Config(poisson_lambda=args.cm3_lambda, sentinel_loss_weight=args.sentinel_loss_weight,
                     caption_mask_prob=args.cm3_caption_mask_prob)


def _retrieval(args):
    if not args.retrieval_k:
        return None
    from megatron_jam.data.retrieval import RetrievalConfig

    return RetrievalConfig(k=args.retrieval_k)


def _sample_options(args) -> dict:
    """How documents become samples (whole documents for instruction data) and which tokens train."""
    return {"whole_documents": getattr(args, "whole_documents", "auto"),
            "prompt_loss": bool(getattr(args, "prompt_loss", False))}


def _check_neighbors(args, blend) -> None:
    """With --retrieval-k, an image-text prefix without neighbours is an error, not silently packed samples."""
    from megatron_jam.data.retrieval import missing_neighbors, neighbors_path

    missing = missing_neighbors(blend, getattr(args, "retrieval_optional", None) or []) if args.retrieval_k else []
    if missing:
        raise ConfigError(f"--retrieval-k {args.retrieval_k}: image-text prefix {missing[0]} has no "
                          f"{neighbors_path(missing[0])}; run tools/retrieve.py --data-path {missing[0]} --index "
                          f"INDEX, or pass --retrieval-optional {missing[0]}, or drop --retrieval-k "
                          "(recipes: RETRIEVAL=0)")


def check_data(args, cfg, checkpoint_dir: str | None = None) -> list:
    """Every dataset the run reads (the --data-path blend, the --valid-data-path sets), before the model is
    built: its .bin against its .idx, its layout against the checkpoint's (`checkpoint_dir`, the folder the run
    resumes from, when it records one) and against the model's vocab_size. Returns the blend's layouts.
    One ConfigError naming the file, as for the other settings a run cannot start with."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_jam.data.integrity import DatasetFileError, check_data_for_checkpoint

    if not args.data_path:
        return []
    blend = list(get_blend_from_list(list(args.data_path))[0])
    _check_neighbors(args, blend)
    named = [entry.partition("=")[2] or entry for entry in args.valid_data_path or []]
    try:
        layouts = check_data_for_checkpoint(blend + named, checkpoint_dir)
    except DatasetFileError as e:
        raise ConfigError(str(e)) from e
    for prefix, layout in layouts.items():
        if layout.vocab_size > cfg.vocab_size:
            raise ConfigError(f"{prefix}: the vocabulary layout has {layout.vocab_size} ids but the model's "
                              f"vocab_size is {cfg.vocab_size} (model config {cfg.to_dict().get('model_type')})")
    return [layouts[p] for p in blend]


def _record_layout(args, layouts) -> None:
    """`<save>/vocab_layout.json`: the data's vocabulary layout travels with the run, so generation and
    evaluation check against exactly it (rank 0; only when every prefix of the blend has the same layout);
    and with it the layout's text and image tokenizers (`megatron_jam.data.run_files`: from --load, else
    from the prefixes' PREFIX.stats.json), so the run folder is all the tools need."""
    import torch.distributed as dist

    from megatron_jam.data.run_files import LAYOUT_FILE, carry_run_files

    save = args.save
    if not save or not layouts or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if any(layout != layouts[0] for layout in layouts[1:]):
        log_rank0(logger, "the --data-path prefixes have different vocabulary layouts: none recorded in %s", save)
        return
    os.makedirs(save, exist_ok=True)
    layouts[0].to_json(os.path.join(save, LAYOUT_FILE))
    load = getattr(args, "load", None)
    carry_run_files(save, layouts[0], load if load and os.path.abspath(load) != os.path.abspath(save) else None,
                    _prefixes(args))


def _prefixes(args) -> list:
    """Every dataset prefix of the run: the --data-path blend's and the named validation sets'."""
    from megatron.core.datasets.utils import get_blend_from_list

    blend = list(get_blend_from_list(list(args.data_path))[0]) if args.data_path else []
    return blend + [entry.partition("=")[2] or entry for entry in args.valid_data_path or []]


def _named_valid_sets(args, cfg, n_valid: int) -> dict:
    from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets

    out = {}
    for entry in args.valid_data_path or []:
        name, sep, prefix = entry.partition("=")
        if not sep:
            name, prefix = entry.rsplit("/", 1)[-1], entry
        _, valid, _ = build_train_valid_test_datasets(
            [prefix], "0,100,0", args.seq_length, args.seed, (None, n_valid, None), _cm3(args),
            retrieval=_retrieval(args), **_sample_options(args), data_cache_path=args.data_cache_path,
            is_built_on_rank=_every_rank)
        out[name] = DatasetSource(valid, name)
    return out


def _valid_documents(args, prefix: str) -> range:
    """The documents of `prefix` in the blend's validation split, as Megatron's builder cuts them; a
    ConfigError when there are none (the builder's rule for a split from which samples are wanted)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    from megatron_jam.data.indexed_builder import read_index_header

    from megatron_jam.data.cm3_dataset import split_document_counts

    n = int(read_index_header(prefix + ".idx")["document_count"]) - 1
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split))
    bounds = matrix[1]
    docs = range(int(round(bounds[0] * n)), int(round(bounds[1] * n))) if bounds else range(0)
    if not docs:
        have = ", ".join(f"{k} {c}" for k, c in zip(("train", "validation", "test"), split_document_counts(matrix, n)))
        raise ConfigError(f"{prefix}: split {args.split} gives 0 validation documents out of {n} ({have}); use a "
                          "larger corpus or a split that leaves the validation set at least one document "
                          "(e.g. --split 90,10,0)")
    return docs


def _document_valid_sets(args, cfg) -> dict:
    """The validation sets scored per document (the default): the blend's split, then the named sets."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_jam.evaluation import DocumentValidation

    def make(name, sources):
        return DocumentValidation(name, sources, cfg.vocab_size, args.seq_length,
                                  args.eval_iters * args.global_batch_size, getattr(args, "eval_stride", None))

    blend = list(get_blend_from_list(list(args.data_path))[0])
    sets = {"valid": make("valid", [(p, _valid_documents(args, p)) for p in blend])}
    for entry in args.valid_data_path or []:
        name, sep, prefix = entry.partition("=")
        name, prefix = (name, prefix) if sep else (entry.rsplit("/", 1)[-1], entry)
        sets[name] = make(name, [(prefix, None)])
    return sets


def build_data_sources(args, cfg, checkpoint_dir: str | None = None) -> tuple[object, dict]:
    """(train source, {validation set name: source}); mock data when no --data-path is given. The data is
    checked first (`check_data`; cached, so the trainer's earlier call costs nothing twice)."""
    n_train = args.train_iters * args.global_batch_size
    evaluates = bool(args.eval_interval and args.eval_iters)
    n_valid = (args.eval_iters * args.global_batch_size * (args.train_iters // args.eval_interval + 1)
               if evaluates else 0)
    if not args.data_path:
        log_rank0(logger, "data: --mock-data (synthetic interleaved documents)")
        valid = MockInterleavedData(cfg.vocab_size, args.seq_length, seed=args.seed + 1)
        train = MockInterleavedData(cfg.vocab_size, args.seq_length, seed=args.seed, num_samples=args.mock_data_samples)
        return train, {"valid": valid}
    from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets

    _record_layout(args, check_data(args, cfg, checkpoint_dir))
    per_document = evaluates and not getattr(args, "cm3_validation", False)
    n_valid = 0 if per_document else n_valid  # per-document validation reads the documents, not samples
    # Samples only from the splits the run reads: no test set, no validation set without --eval-interval
    # (0 = an empty set, so a tiny corpus whose split rounds them to 0 documents still trains).
    train, valid, _ = build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, args.seed, (n_train, n_valid, 0), _cm3(args),
        retrieval=_retrieval(args), **_sample_options(args), data_cache_path=args.data_cache_path,
        is_built_on_rank=_every_rank)
    if not evaluates:
        if args.valid_data_path:
            log_rank0(logger, "no --eval-interval (or --eval-iters 0): the validation sets are not built")
        return DatasetSource(train, "train"), {}
    if per_document:
        return DatasetSource(train, "train"), _document_valid_sets(args, cfg)
    sets = {} if valid is None else {"valid": DatasetSource(valid, "valid")}
    sets.update(_named_valid_sets(args, cfg, n_valid))
    return DatasetSource(train, "train"), sets
