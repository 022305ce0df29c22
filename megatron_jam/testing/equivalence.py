"""Parallel equivalence: one step of a model at TP=1/PP=1 against the same step at another layout.

Why here and not in tests/: the bodies run inside `WorkerPool` ranks (they
must be importable by spawned processes) and the benchmarks reuse them.
Each layout runs through the real training path: `build_model_chunks`
(DDP-wrapped chunks), Megatron-Core's schedules with several micro-batches,
and `finalize_model_grads`. Weights are copied from the reference into the
other layout through the checkpoint metadata, and gradients are gathered back
to full tensors under the same keys, so every parameter is compared.
"""

import torch
import torch.distributed as dist

from megatron_jam.models.kinds import model_class, model_config_from_dict
from megatron_jam.parallel.initialize import initialize_model_parallel
from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs
from megatron_jam.parallel.schedule import forward_backward
from megatron_jam.parallel.state import gather_full_state_dict, load_full_state_dict, params_as_grads


def make_batches(vocab_size: int, num_microbatches: int, micro_batch_size: int, seq_length: int,
                 seed: int = 0) -> list[dict]:
    """Deterministic random LM micro-batches (identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        ids = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=g)
        mask = (torch.rand(micro_batch_size, seq_length, generator=g) > 0.1).float()
        batches.append({
            "tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": mask,
            "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1).contiguous(),
        })
    return batches


def _mean_loss(reports: list) -> float | None:
    if not reports:
        return None
    return float(torch.stack([r["lm loss"] for r in reports]).mean())


def run_layout(cfg, batches: list[dict], tp: int = 1, pp: int = 1, vpp: int | None = None,
               sequence_parallel: bool = False, weights: dict | None = None, load: str | None = None,
               seed: int = 1234, **config_fields):
    """One forward-backward step at a layout, of either model kind; weights from `weights` (full tensors),
    or from the checkpoint `load` (re-sharded by `dist_checkpointing`), else the seeded initialisation;
    `config_fields` go to the `TransformerConfig` (e.g. `attention_backend`).

    Returns (loss, full weights, full grads, parameters held by this rank) on every rank.
    """
    initialize_model_parallel(tp, pp, vpp, seed=seed)
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp, pp, vpp, sequence_parallel, **config_fields))
    local_numel = sum(p.numel() for c in chunks for p in c.parameters())
    if weights is not None:
        load_full_state_dict(chunks, weights)
    if load is not None:
        from megatron_jam.convert.checkpoint import load_checkpoint

        load_checkpoint([c.module for c in chunks], load)
    full_weights = gather_full_state_dict(chunks)
    mbs, seq = batches[0]["tokens"].shape
    reports = forward_backward(chunks, [iter(batches) for _ in chunks], len(batches), seq, mbs)
    with params_as_grads(chunks):
        grads = gather_full_state_dict(chunks)
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, _mean_loss(reports))
    loss = next(x for x in losses if x is not None)
    return loss, full_weights, grads, local_numel


def relative_errors(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per key: max |got - ref| / max |ref| (keys must match exactly)."""
    if set(ref) != set(got):
        raise AssertionError(f"keys differ: only in ref {sorted(set(ref) - set(got))}, "
                             f"only in other {sorted(set(got) - set(ref))}")
    return {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30)) for k in ref}


def equivalence_body(cfg_dict: dict, layouts: list[dict], num_microbatches: int = 4,
                     micro_batch_size: int = 2, seed: int = 0, load: str | None = None) -> dict:
    """Reference TP=1/PP=1 step (weights from the checkpoint `load` when given), then each layout from the
    same weights; returns per-layout errors. `cfg_dict`: a JAM-Cross or single-stack model config."""
    cfg = model_config_from_dict(cfg_dict)
    batches = make_batches(cfg.vocab_size, num_microbatches, micro_batch_size, cfg.seq_length, seed)
    ref_loss, ref_w, ref_g, ref_numel = run_layout(cfg, batches, load=load)
    out = {"reference_loss": ref_loss, "keys": sorted(ref_g), "reference_local_numel": ref_numel,
           "layouts": {}}
    for layout in layouts:
        loss, w, g, numel = run_layout(cfg, batches, weights=ref_w, **layout)
        errs = relative_errors(ref_g, g)
        worst = max(errs, key=errs.get)
        zero = sorted(k for k, t in ref_g.items() if float(t.abs().max()) == 0.0)
        out["layouts"][str(layout)] = {
            "loss": loss, "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
            "weights_max_rel_err": max(relative_errors(ref_w, w).values()),
            "local_numel": numel, "grad_worst_key": worst, "grad_worst_rel_err": errs[worst], "zero_grad_keys": zero,
        }
    return out
