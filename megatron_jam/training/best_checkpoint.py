"""The best checkpoint of an epoch run: lowest average validation perplexity, recorded beside `latest`.

Why: the paper selects checkpoints by average validation perplexity (section
3.1: "the one with the lowest average validation PPL"), and picks an
instruction-tuned epoch by hand, so both the measure and every epoch's value
must be on disk. After each validation of a `--train-epochs` run with
`--save`:

- the average is over the named `--valid-data-path` sets when the run has
  any (each set counts once, whatever its size), else over the blend's own
  validation split; it is the mean of the perplexities, not of the losses;
- a new best is saved at once (unless this iteration is already saved) and,
  only once that checkpoint is complete, named in
  `<save>/best_checkpointed_iteration.txt` (as `latest_checkpointed_iteration.txt`
  names the newest) and `<save>/best` (a link to its `iter_N` folder);
- `<save>/best_checkpoint.json` holds the best and every validation so far
  (iteration, epoch, per-set and average perplexity), and is read back on a
  resume so the comparison goes on.

Load it with `--load <save> --ckpt-step $(cat <save>/best_checkpointed_iteration.txt)`.
Nothing here deletes checkpoints (the trainer keeps them all).
"""

from __future__ import annotations

import json
import math
import os

from megatron_jam.training.epochs import epoch_of
from megatron_jam.utils.logging import get_logger, global_rank, log_rank0

logger = get_logger(__name__)

BEST_TRACKER = "best_checkpointed_iteration.txt"
BEST_RECORD = "best_checkpoint.json"
BEST_LINK = "best"


def average_perplexity(results: dict, named_sets: list) -> tuple[float, dict]:
    """(mean perplexity, {set: perplexity}) over the named sets present in `results`, else over all."""
    names = [n for n in named_sets if n in results] or list(results)
    ppl = {n: math.exp(min(float(results[n]["lm_loss"]), 50.0)) for n in names}
    return sum(ppl.values()) / len(ppl), ppl


def read_best(root: str) -> int | None:
    """The iteration named by `<root>/best_checkpointed_iteration.txt`, or None."""
    path = os.path.join(root, BEST_TRACKER)
    if not os.path.exists(path):
        return None
    return int(open(path).read().strip())


class BestCheckpoint:
    """Tracks the lowest average validation perplexity of a run and keeps its checkpoint named."""

    def __init__(self, args):
        self.args = args
        self.named = [e.partition("=")[0] if "=" in e else e.rsplit("/", 1)[-1] for e in args.valid_data_path or []]
        self.record = {"best": None, "validations": []}
        path = os.path.join(args.save, BEST_RECORD)
        if os.path.exists(path):  # a resumed run compares with what it already saw
            with open(path) as f:
                self.record = json.load(f)

    def observe(self, run, results: dict) -> bool:
        """Record one validation; save and name the checkpoint when it is a new best. Returns whether it was."""
        if not results:
            return False
        avg, per_set = average_perplexity(results, self.named)
        entry = {"iteration": run.iteration, "epoch": epoch_of(self.args, run.iteration),
                 "average_ppl": avg, "ppl": per_set}
        self.record["validations"] = [v for v in self.record["validations"] if v["iteration"] < run.iteration]
        self.record["validations"].append(entry)
        best = self.record["best"]
        improved = best is None or avg < best["average_ppl"] or best["iteration"] >= run.iteration
        if improved:
            run.save()
            if run.async_queue is not None:  # --async-save: name it only once it is complete (queue kept open)
                run.async_queue.maybe_finalize_async_calls(blocking=True)
            self.record["best"] = entry
            log_rank0(logger, "best checkpoint: iteration %d, average validation perplexity %.4f over %s",
                      run.iteration, avg, ", ".join(per_set))
        self._write(improved)
        return improved

    def _write(self, improved: bool) -> None:
        if global_rank() != 0:
            return
        save = self.args.save
        _write_atomic(os.path.join(save, BEST_RECORD), json.dumps(self.record, indent=2))
        if improved:
            iteration = self.record["best"]["iteration"]
            _write_atomic(os.path.join(save, BEST_TRACKER), str(iteration))
            link, tmp = os.path.join(save, BEST_LINK), os.path.join(save, f".{BEST_LINK}.tmp{os.getpid()}")
            os.symlink(f"iter_{iteration:07d}", tmp)
            os.replace(tmp, link)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
