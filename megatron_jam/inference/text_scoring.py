"""Text-only scoring and greedy text decoding with a fused model: what zero-shot benchmarks ask of it.

Why a module of its own: a text benchmark (PIQA, ARC, ... through `lm-eval`, `megatron_jam.harness`) asks how
likely a *text* continuation is, and what text the model writes. The fused vocabulary also holds image codes,
`<break>`, `<mask>`, CM3 sentinels and padded rows; the probability the model puts on them is probability of
events a text model cannot produce. So every score here is renormalised over the text ids::

    log p(t | x) = logit_t - logsumexp_{v in T} logit_v,    T = the layout's text ids + <eos>

(`VocabMasks.text_mode(allow_break=False)`: exactly what text-mode generation may write when no image may be
opened; `<eos>` is kept because ending a document is a text event and the harness stops generation on it).
Greedy decoding takes the argmax over the same set, so "is greedy" and "what greedy writes" agree.

Tensor parallelism: logits stay split over the vocabulary (`[n, V/tp]`, Megatron's `parallel_output`); the
maximum, the sum of exponentials, the target's logit and the argmax are reduced over the TP group (four
all-reduces of `[n]`), never an all-gather of `[b, s, V]`. Decoding uses the KV-cache stepper of generation
(`stepper.py`, logits gathered there, one row per prompt).
"""

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_jam.data.vocab import VocabLayout
from megatron_jam.inference.kv_cache import KVCache, SlotTable
from megatron_jam.inference.sampling import VocabMasks, restrict


def text_mask(layout: VocabLayout, padded_vocab_size: int) -> Tensor:
    """`[V_padded]` bool: the ids scores are normalised over (text ids and `<eos>`; see the module docstring)."""
    return VocabMasks(layout, padded_vocab_size).text_mode(allow_break=False, allow_eos=True)


def _tp_group():
    """The tensor-parallel group when the vocabulary is split (TP > 1), else None (nothing to reduce)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _all_reduce(x: Tensor, op, group) -> Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def text_log_probs(logits: Tensor, targets: Tensor, allowed: Tensor, vocab_start: int = 0,
                   group=None) -> tuple[Tensor, Tensor]:
    """(log p of each target over the allowed ids `[n]`, whether it is the argmax `[n]`).

    `logits` `[n, V/tp]` hold this rank's vocabulary shard [vocab_start, vocab_start + V/tp); `allowed` `[V/tp]`
    is the shard of `text_mask`; `targets` `[n]` are global ids. A target outside the allowed ids gets -inf.
    The argmax is torch's (the lowest id among equal maxima), over the whole vocabulary."""
    x = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
    local_max, local_arg = x.max(dim=-1)
    top = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    sum_exp = _all_reduce((x - top[:, None]).exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    width = x.shape[-1]
    mine = (targets >= vocab_start) & (targets < vocab_start + width)
    picked = x.gather(-1, (targets - vocab_start).clamp(0, width - 1)[:, None])[:, 0]
    target_logit = _all_reduce(torch.where(mine, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
    never = torch.iinfo(torch.long).max
    candidate = torch.where(local_max == top, local_arg + vocab_start, torch.full_like(local_arg, never))
    argmax = _all_reduce(candidate, dist.ReduceOp.MIN, group)
    return target_logit - top - sum_exp.log(), argmax == targets


def shard_log_probs(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """`text_log_probs` of this rank's vocabulary shard of `logits` `[n, V/tp]` (`mask` is the full `[V]`
    `text_mask`), reduced over the tensor-parallel group."""
    from megatron.core import parallel_state

    group = _tp_group()
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width if group is not None else 0
    return text_log_probs(logits, targets.to(logits.device), mask[start:start + width], start, group)


def _left_padded(prompts: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, positions, valid) `[b, width]` of prompts aligned on their last token (as decoding.py)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(b, width, dtype=torch.long)
    positions = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        positions[i, width - len(p):] = torch.arange(len(p))
        valid[i, width - len(p):] = True
    return tokens, positions, valid


def greedy_text(stepper, prompts: list[list[int]], allowed: Tensor, eos_id: int, max_new_tokens: int,
                stop=None) -> list[list[int]]:
    """Greedy continuation of every prompt over `allowed` (`text_mask`), batched with a KV cache.

    A row ends at `<eos>` (not included), when `stop(ids)` is true for its ids so far (the harness's stop
    strings), or after `max_new_tokens`; the caller keeps prompt + budget within the model's positions.
    Ids are broadcast from the first TP rank, as generation does, so ranks never diverge."""
    from megatron_jam.inference.decoding import _tp_broadcast

    tokens, positions, valid = _left_padded(prompts)
    slots = SlotTable(len(prompts), tokens.shape[1] + max_new_tokens)
    start, n = slots.add(tokens, positions, valid), tokens.shape[1]
    cache, out, live = KVCache(slots.capacity), [[] for _ in prompts], [True] * len(prompts)
    for _ in range(max_new_tokens):
        chosen = _tp_broadcast(restrict(stepper.step(slots, cache, start, n), allowed).argmax(dim=-1))
        for i, tok in enumerate(chosen.tolist()):
            if live[i]:
                live[i] = _take(out[i], tok, eos_id, stop)
        if not any(live):
            break
        start, n = _feed(slots, prompts, out, live), 1
    return out


def _take(ids: list[int], tok: int, eos_id: int, stop) -> bool:
    """Append `tok` to a live row's `ids` unless it is `<eos>`; whether the row goes on."""
    if tok == eos_id:
        return False
    ids.append(tok)
    return stop is None or not stop(ids)


def _feed(slots: SlotTable, prompts: list[list[int]], out: list[list[int]], live: list[bool]) -> int:
    """One slot per row: a live row's last id at its next position; finished rows get an invalid slot."""
    b = len(prompts)
    tokens = torch.tensor([[o[-1] if (alive and o) else 0] for o, alive in zip(out, live)], dtype=torch.long)
    positions = torch.tensor([[len(p) + len(o) - 1] for p, o in zip(prompts, out)], dtype=torch.long)
    return slots.add(tokens, positions, torch.tensor(live, dtype=torch.bool).view(b, 1))
