"""`--train-epochs N`: training length in passes over the data, with a validation and a checkpoint per epoch.

Why: the paper's instruction tuning is epoch-based (15 epochs, checkpoint of
the 9th kept), and an instruction set is small (LIMA 1k, wikiHow 3k
documents), so "how many iterations is one pass" depends on the data and the
batch size; Megatron-LM has only `--train-iters` / `--train-samples`. Here an
epoch is computed from the training split of the `--data-path` prefixes:

- samples per epoch: per prefix, its training documents when its samples are
  whole documents (instruction data, retrieval), else Megatron's packed count
  ((tokens - 1) // seq_length); summed over the blend (the blend weights then
  decide how an epoch is shared: weights proportional to these counts make
  each prefix pass once per epoch);
- iterations per epoch: ceil(samples per epoch / global batch size); the run
  trains N times that, validates every epoch (`--eval-interval` defaults to
  it) and saves every epoch (`--save-interval` defaults to it).

As Megatron-LM, samples are drawn from Megatron's shuffled multi-epoch index:
over the run every document is seen N times (up to the rounding of the last
batch), but the first N - 1 passes are shuffled together, so an "epoch" is a
number of samples, not a strict pass.
"""

from __future__ import annotations

import math

from megatron_jam.models.config import ConfigError
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


def train_documents(num_documents: int, split: str) -> range:
    """The training split's documents of a prefix, as Megatron's builder cuts them (the first fraction)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[0]
    if bounds is None:
        return range(0)
    return range(int(round(bounds[0] * float(num_documents))), int(round(bounds[1] * float(num_documents))))


def prefix_epoch_samples(prefix: str, split: str, seq_length: int, whole_documents: str, retrieval: bool) -> int:
    """Samples in one pass over the training split of `prefix` (see the module docstring)."""
    from megatron_jam.data.cm3_dataset import DocumentReader
    from megatron_jam.data.sample_layouts import sample_layout, samples_per_epoch

    try:
        reader = DocumentReader(prefix, None)
    except (ValueError, OSError) as e:  # a missing or broken set: the message names the file
        raise ConfigError(f"--train-epochs: {e}") from e
    docs = train_documents(reader.num_documents, split)
    lengths = reader.doc_lengths[docs.start:docs.stop]
    return samples_per_epoch(lengths, sample_layout(prefix, whole_documents, retrieval), seq_length)


def resolve_train_epochs(args) -> None:
    """Set --train-iters (and the default eval / save intervals) from --train-epochs; one-line errors."""
    from megatron.core.datasets.utils import get_blend_from_list

    if args.train_iters is not None or args.train_samples is not None:
        raise ConfigError("--train-epochs excludes --train-iters and --train-samples (give one; the instruct "
                          "recipe passes --train-epochs, EPOCHS=N changes it)")
    if args.train_epochs < 1:
        raise ConfigError(f"--train-epochs {args.train_epochs}: expected at least 1")
    if not args.data_path:
        raise ConfigError("--train-epochs needs --data-path (an epoch is a pass over its training split)")
    prefixes = get_blend_from_list(list(args.data_path))[0]
    counts = {p: prefix_epoch_samples(p, args.split, args.seq_length, args.whole_documents, bool(args.retrieval_k))
              for p in prefixes}
    per_epoch = sum(counts.values())
    if per_epoch == 0:
        raise ConfigError(f"--train-epochs: the training split ({args.split}) of {' '.join(prefixes)} holds no "
                          "sample; use a larger corpus or a split with a training share")
    args.epoch_iters = math.ceil(per_epoch / args.global_batch_size)
    args.train_iters = args.train_epochs * args.epoch_iters
    args.eval_interval = args.eval_interval or args.epoch_iters
    args.save_interval = args.save_interval or (args.epoch_iters if args.save else None)
    log_rank0(logger, "--train-epochs %d: %d training samples per epoch (%s), %d iterations of %d samples per "
              "epoch, %d iterations; validation every %d and checkpoint every %s iterations", args.train_epochs,
              per_epoch, ", ".join(f"{p}: {n}" for p, n in counts.items()), args.epoch_iters,
              args.global_batch_size, args.train_iters, args.eval_interval, args.save_interval)


def epoch_of(args, iteration: int) -> float | None:
    """The epoch (1-based, fractional between epoch ends) that `iteration` completes; None without epochs."""
    epoch_iters = getattr(args, "epoch_iters", None)
    return iteration / epoch_iters if epoch_iters else None
