"""`MegatronJamLM`: the lm-eval `LM` of a megatron-jam checkpoint (`--model megatron_jam`).

What each lm-eval request becomes:

- `loglikelihood` (multiple choice: PIQA, ARC, StoryCloze, Winograd, Winogrande): context and continuation
  are encoded together (lm-eval's `_encode_pair`), run through the model's full forward in batches (longest
  first, right-padded: attention is causal, so padding after a row changes nothing before it), and the
  continuation's log-probability is summed, renormalised over the text ids of the fused vocabulary
  (`megatron_jam.inference.text_scoring`: image codes, `<break>` and CM3 sentinels take no probability mass);
  "is greedy" is the argmax over the same ids.
- `loglikelihood_rolling` (perplexity tasks): lm-eval's disjoint rolling windows of `max_length`, scored the
  same way.
- `generate_until`: greedy over text ids and `<eos>`, with the KV-cache stepper of generation, stopped at
  `<eos>`, at a stop string or after `max_gen_toks`; sampling is not offered (the harness's standard tasks are
  greedy).

Document boundary: training documents follow the previous document's `<eos>` (the packed stream of
`megatron_jam.data.documents`); encoding adds no BOS. So every context starts with `<eos>` by default
(`add_eos_prefix=True`, the role BOS plays for a Hugging Face Llama in lm-eval); `add_eos_prefix=False` gives
the bare text (an empty context still gets `<eos>`, lm-eval's `prefix_token_id`).

Tensor parallelism: every rank holds one shard of the model and runs every request (lm-eval sees
`rank=0, world_size=1` on each, so all ranks issue the same forwards in the same order); the vocabulary stays
split for scoring. `tools/eval_harness.py` runs it under torchrun and writes from rank 0 only. No data
parallelism: the number of processes must equal `tp`.
"""

from __future__ import annotations

import os

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_jam.inference.loading import LAYOUT_FILES, GenerationSetupError
from megatron_jam.utils.logging import get_logger, global_rank, log_rank0

logger = get_logger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


@register_model("megatron_jam")
class MegatronJamLM(TemplateLM):
    """A megatron-jam checkpoint (converted or trained) as an lm-eval model; see the module docstring.

    model_args: `load` (checkpoint folder, required), `tp` (tensor-parallel size, default: the number of
    processes), `ckpt_step` (a training folder's iteration, default latest), `vocab_layout` / `tokenizer_model` /
    `tokenizer_type` (default: the folder's `vocab_layout.json` and `tokenizer/`), `max_length` (default: the
    checkpoint's seq_length), `max_gen_toks` (256), `add_eos_prefix` (True). lm-eval's `--batch_size N` sets the
    batch (default 8; `auto` is not implemented and falls back to 8); its `device` and `max_batch_size` are
    ignored (the model sits on this rank's GPU when there is one, as `load_model` places it)."""

    def __init__(self, load: str | None = None, tp: int | None = None, ckpt_step: int | None = None,
                 vocab_layout: str | None = None, tokenizer_model: str | None = None,
                 tokenizer_type: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_eos_prefix: bool = True, batch_size=None,
                 max_batch_size=None, device=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise GenerationSetupError(f"megatron_jam: unknown model_args {', '.join(sorted(unknown))} (known: load, "
                                       "tp, ckpt_step, vocab_layout, tokenizer_model, tokenizer_type, max_length, "
                                       "max_gen_toks, add_eos_prefix)")
        cfg, self.layout, self.text = load_text_side(load, vocab_layout, tokenizer_model, tokenizer_type)
        self.model, self.cfg = load_parallel_model(load, tp, ckpt_step)
        from megatron_jam.inference.stepper import build_stepper, max_positions
        from megatron_jam.inference.text_scoring import text_mask

        self.mask = text_mask(self.layout, self.cfg.padded_vocab_size)
        self.stepper = build_stepper(self.model, self.cfg)
        self._device = next(self.model.parameters()).device
        self._max_length = int(max_length or min(self.cfg.seq_length, max_positions(self.cfg)))
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = parse_batch_size(batch_size)
        self.add_eos_prefix = bool(add_eos_prefix)
        log_rank0(logger, "lm-eval: %s, max_length %d, batch %d, scores over %d text ids of %d", load,
                  self._max_length, self.batch_size, int(self.mask.sum()), self.cfg.padded_vocab_size)

    # ------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.layout.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.text.identity

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text ids of `string`, after `<eos>` (the document boundary) unless `add_special_tokens=False` or
        `add_eos_prefix=False`."""
        ids = self.text.encode(string)
        return [self.eot_token_id] + ids if self.add_eos_prefix and add_special_tokens is not False else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.text.decode([t for t in tokens if self.layout.is_text(t)])

    # ------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """[(sum of log p over the continuation, all greedy)] of `(key, context ids, continuation ids)`."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm or global_rank() != 0, desc="loglikelihood")
        results = []
        for batch in order.get_batched(n=override_bs or self.batch_size):
            scores = self._score_batch([(ctx, cont) for _, ctx, cont in batch])
            for (key, _, _), score in zip(batch, scores):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, score)
            results += scores
            bar.update(len(batch))
        bar.close()
        return order.get_original(results)

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from megatron_jam.inference.text_scoring import shard_log_probs

        rows, where, targets = [], [], []
        for i, (ctx, cont) in enumerate(pairs):
            row = (ctx + cont)[-(self.max_length + 1):][:-1]  # the model reads all but the last id
            if not cont or len(cont) > len(row):
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
            rows.append(row)
            where += [(i, s) for s in range(len(row) - len(cont), len(row))]
            targets += cont
        logits = self._forward(rows)  # [b, s, V/tp]
        b_idx, s_idx = (torch.tensor(x, device=logits.device) for x in zip(*where))
        logp, greedy = shard_log_probs(logits[b_idx, s_idx], torch.tensor(targets), self.mask)  # [n] each
        sizes = [len(cont) for _, cont in pairs]
        return [(float(lp.double().sum()), bool(g.all()))
                for lp, g in zip(logp.cpu().split(sizes), greedy.cpu().split(sizes))]

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits `[b, s, V/tp]` of right-padded rows (padding: `<eos>`, never read by an earlier position)."""
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        tokens = tokens.to(self._device)
        return self.model(tokens, torch.arange(width, device=self._device).expand_as(tokens))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint windows of `max_length` after `<eos>`."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text of each `(context, gen_kwargs)`, batched per gen_kwargs, longest context first."""
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        bar = tqdm(total=len(requests), disable=disable_tqdm or global_rank() != 0, desc="generate_until")
        results = []
        for batch in order.get_batched(n=self.batch_size):
            contexts, kwargs = zip(*batch)
            texts = self._generate_batch(list(contexts), kwargs[0])
            for context, text in zip(contexts, texts):
                self.cache_hook.add_partial("generate_until", (context, kwargs[0]), text)
            results += texts
            bar.update(len(batch))
        bar.close()
        return order.get_original(results)

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from megatron_jam.inference.text_scoring import greedy_text

        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample"):
            log_rank0(logger, "generate_until: do_sample=True asked; megatron_jam decodes greedily")
        until = handle_stop_sequences(kwargs.get("until"), eos=None)
        budget = int(kwargs["max_gen_toks"])
        if budget >= self.max_length:
            raise ValueError(f"max_gen_toks {budget} leaves no room for a context in max_length {self.max_length}")
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-(self.max_length - budget):] for c in contexts]
        stop = (lambda ids: any(s and s in self.tok_decode(ids) for s in until)) if until else None
        outs = greedy_text(self.stepper, prompts, self.mask, self.eot_token_id, budget, stop)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in outs]


def parse_batch_size(value) -> int:
    """lm-eval passes `--batch_size` as typed ("8", 8, "auto", "auto:4"); `auto` (lm-eval's search for the
    largest batch that fits) is not implemented here: the default size, said once."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if str(value).startswith("auto"):
        log_rank0(logger, "--batch_size %s: not searched, using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise GenerationSetupError(f"--batch_size {value}: not a number") from None
    if size < 1:
        raise GenerationSetupError(f"--batch_size {value} must be >= 1")
    return size


def load_text_side(load: str | None, vocab_layout: str | None, tokenizer_model: str | None,
                   tokenizer_type: str | None):
    """(model config, vocabulary layout, text tokenizer), each checked against the others before any model is
    built; a missing one names the model_arg that gives it."""
    from megatron_jam.data.run_files import run_tokenizer
    from megatron_jam.inference.loading import check_checkpoint_layout, load_text_tokenizer, resolve_layout
    from megatron_jam.models.kinds import load_model_config

    if not load:
        raise GenerationSetupError("megatron_jam: give load=CKPT in --model_args (a converted or trained checkpoint)")
    if not os.path.isdir(load):
        raise FileNotFoundError(f"megatron_jam: load={load}: no such directory")
    if vocab_layout is None and not any(os.path.exists(os.path.join(load, f)) for f in LAYOUT_FILES):
        raise GenerationSetupError(f"no vocabulary layout in {load}: give vocab_layout=PATH (the dataset's "
                                   "PREFIX.vocab.json) in --model_args")
    cfg = load_model_config(load)
    layout = resolve_layout(load, vocab_layout)
    check_checkpoint_layout(load, cfg, layout)
    path = tokenizer_model or run_tokenizer(load)
    if path is None:
        raise GenerationSetupError(f"no text tokenizer in {load}/tokenizer/: give tokenizer_model=PATH (a "
                                   "sentencepiece .model or a tokenizer.json) in --model_args")
    return cfg, layout, load_text_tokenizer(path, layout, tokenizer_type if tokenizer_model else None)


def load_parallel_model(load: str, tp: int | None, ckpt_step: int | None):
    """(model, cfg) on this rank's tensor-parallel shard; starts torch.distributed and Megatron's groups when the
    caller has not (one process, or torchrun with one process per shard)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_jam.inference.loading import load_model
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel

    initialize_distributed()
    world = dist.get_world_size()
    tp = int(tp or world)
    if tp != world:
        raise GenerationSetupError(f"megatron_jam: tp={tp} but {world} processes: each process holds one "
                                   f"tensor-parallel shard (torchrun --nproc-per-node {tp}; no data parallelism)")
    if not (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == tp):
        initialize_model_parallel(tp, 1)
    return load_model(load, tp, iteration=ckpt_step)
