"""Step statistics and where they go: a Megatron-style log line, `metrics.jsonl`, TensorBoard, W&B.

Why one place: the loss over all tokens and over text and image targets
separately is reduced once (micro-batches, then data-parallel ranks) and then
written everywhere in the same form, so the log line, the JSON lines that
scripts parse and the TensorBoard curves cannot disagree.
"""

import json
import math
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_jam.parallel.state import comm_device
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

_FIELDS = ("lm loss", "text loss sum", "text tokens", "image loss sum", "image tokens")


def reduce_step_losses(reports: list) -> dict:
    """Loss of a step from the last stage's per-micro-batch reports, averaged over data-parallel
    ranks; NaN on other stages. Keys: lm_loss, text_loss, image_loss (NaN without such tokens)."""
    if not reports:
        return {"lm_loss": float("nan"), "text_loss": float("nan"), "image_loss": float("nan")}
    sums = torch.zeros(6, dtype=torch.float64, device=comm_device())
    for r in reports:
        sums[0] += float(r["lm loss"])
        sums[1] += 1
        for i, key in enumerate(_FIELDS[1:], start=2):
            sums[i] += float(r.get(key, 0.0))
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = sums.cpu()
    ratio = lambda a, b: float(sums[a] / sums[b]) if sums[b] > 0 else float("nan")  # noqa: E731
    return {"lm_loss": ratio(0, 1), "text_loss": ratio(2, 3), "image_loss": ratio(4, 5)}


def any_rank_true(flag: bool) -> bool:
    """A boolean OR over all ranks (every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def is_logging_rank() -> bool:
    """The rank that holds the loss and logs it (last pipeline stage, first TP and DP rank)."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


class MetricsWriter:
    """Writes each logged step to the log, a JSON-lines file, and optionally TensorBoard / W&B."""

    def __init__(self, metrics_file: str | None, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None, run_config: dict | None = None, start_iteration: int = 0):
        self.active = is_logging_rank()
        self._file = self._tb = self._wandb = None
        if not self.active:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            drop_rows_after(metrics_file, start_iteration)
            self._file = open(metrics_file, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard-dir needs the `tensorboard` package (pip install tensorboard)") from e
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb-project needs the `wandb` package (pip install wandb)") from e
            self._wandb = wandb.init(project=wandb_project, config=run_config or {})

    def write(self, record: dict, line: str) -> None:
        if not self.active:
            return
        logger.info(line)
        if self._file:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        step = record.get("iteration", 0)
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                if self._tb:
                    self._tb.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log({k: v for k, v in record.items() if k != "iteration"}, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def drop_rows_after(path: str, iteration: int) -> None:
    """Remove the rows of iterations after `iteration` (the one the run starts from) from a metrics file.

    Why: a run that died after its last checkpoint logged steps that the resumed run replays; the
    checkpoint defines what happened, so the file keeps one row per step. Rewritten atomically (a
    crash here leaves the old file); lines that are not JSON (a write cut by a kill) are dropped too."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] > iteration:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    logger.info("%s: dropped %d rows past iteration %d (the run continues from its checkpoint)", path, dropped,
                iteration)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def format_modality_loss(v: float) -> str:
    """A text / image loss for the log line: 'n/a' where the batch had no tokens of that modality
    (the value is NaN then; metrics.jsonl holds null)."""
    return "n/a" if math.isnan(v) else f"{v:.4E}"


def format_line(r: dict, train_iters: int) -> str:
    """Megatron-LM's iteration line, plus text/image losses and throughput."""
    return (f" iteration {r['iteration']:6d}/{train_iters:6d} | consumed samples: {r['consumed_samples']:9d} | "
            f"elapsed time per iteration (ms): {r['iteration_time_ms']:.1f} | learning rate: {r['lr']:.3E} | "
            f"global batch size: {r['global_batch_size']:5d} | lm loss: {r['lm_loss']:.6E} | "
            f"text loss: {format_modality_loss(r['text_loss'])} | "
            f"image loss: {format_modality_loss(r['image_loss'])} | "
            f"grad norm: {r['grad_norm']:.3f} | "
            f"tokens/s: {r['tokens_per_sec']:.0f} | TFLOP/s/GPU: {r['tflops_per_gpu']:.3f} | "
            f"skipped iterations: {r['skipped_iterations']}")
