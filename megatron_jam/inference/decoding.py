"""Mixed-modal decoding (paper section 3.1): the per-row state machine and the batched decode loop.

Each prompt is one *conditional* row. Its state machine::

    TEXT  --<break>-->  IMAGE (exactly tokens_per_image image ids, CFG)  -->  AFTER_IMAGE
      |                                                                       |  |
      +--<eos>--> DONE                        DONE <--<eos>--+  +--<break>--> TEXT (first token: text)

- TEXT samples text ids, `<eos>` and `<break>`; image ids, `<mask>`, CM3
  sentinels and padded rows never. `<break>` is allowed only when the whole
  image (and its `<break>`) fits in what is left of the row's budget, so an
  image is never started that cannot be finished. A text segment that
  follows an image's `<break>` starts with a text token (a document never
  holds `<break><break>` or `<break><eos>`).
- IMAGE samples from the image ids only, `tokens_per_image` times, with
  classifier-free guidance: the row's logits are combined with those of its
  *unconditional* row (eq. 6). The unconditional context is the prompt (and
  everything generated before the image) replaced by CM3's first mask
  sentinel: that row holds `<sentinel:0> <break>` followed by the image
  tokens sampled so far. Training teaches exactly this context (a caption
  masked whole by the CM3 objective, `CM3Config.caption_mask_prob`), so its
  embedding rows are trained; the paper's `<mask>` would be a token that no
  training sample contains (docs/generation.md). Both
  rows run in the same batch (rows [0, B) conditional, [B, 2B)
  unconditional). After the image the unconditional row forgets its
  `<break>` and image slots (they become invalid), ready for the next image.
- AFTER_IMAGE samples `<eos>` or `<break>` (back to text).
- Image formats with structure (`megatron_jam.data.image_format`, Emu3's):
  `<break>` is the image's opening marker (`<|image start|>`), and IMAGE walks
  the format's plan for the grid (`self.grid`, the layout's default): the size
  text, `<|image token|>`, the end-of-line token after every row of w codes,
  end-of-frame and `<|image end|>` are forced (no sampling, no guidance); only
  code slots are sampled, from the image ids with guidance. Opening an image
  needs the whole structure in the budget; after it the row is back in TEXT.
- A row stops at `<eos>` ("eos") or when its budget, min(max_new_tokens,
  context - prompt length), is spent ("length"). A prompt that ends with
  `<break>` starts in IMAGE mode (text-to-image).

Rows advance in lockstep, one slot per step (kv_cache.py); finished rows and
idle unconditional rows get invalid slots. With `use_cache=False` every step
recomputes all slots from scratch (the reference the cache is tested against,
and the benchmark's baseline). `decode_step` other than "eager" runs the steps
after the prompt with fixed shapes (static_decode.py: CUDA graphs). Sampled ids are broadcast from the first
tensor-parallel rank, so TP ranks never diverge.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_jam.data.image_format import SAMPLE
from megatron_jam.data.vocab import VocabLayout
from megatron_jam.inference.kv_cache import KVCache, SlotTable
from megatron_jam.inference.sampling import SamplingParams, VocabMasks, cfg_combine, restrict, sample
from megatron_jam.inference.static_decode import StaticDecoder, check_decode_step
from megatron_jam.inference.stepper import build_stepper, max_positions

TEXT, IMAGE, AFTER_IMAGE, DONE = "text", "image", "after_image", "done"


@dataclass
class Generation:
    """What one prompt produced."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    """Generated ids (the prompt excluded), `<break>` and a final `<eos>` included."""
    finish_reason: str = ""
    """'eos' or 'length'."""


@dataclass
class _Row:
    state: str
    budget: int
    position: int
    out: Generation
    image_count: int = 0
    after_break: bool = False
    uncond_position: int = 1
    uncond_break_slot: int = -1
    plan: list[int] = field(default_factory=list)
    """The current image's slots after its opening token: a forced id (markers, size, end-of-line) or SAMPLE."""


class InterleavedGenerator:
    """Batched mixed-modal generation with a JAM model (any of the three methods) on one pipeline stage."""

    def __init__(self, model, cfg, layout: VocabLayout, context_length: int | None = None,
                 use_cache: bool = True, stepper=None, decode_step: str = "eager"):
        check_layout_matches_model(layout, cfg)
        self.cfg, self.layout, self.use_cache = cfg, layout, use_cache
        self.stepper = stepper if stepper is not None else build_stepper(model, cfg)
        if decode_step != "eager":
            if not use_cache:
                raise ValueError(f"--decode-step {decode_step} runs over the KV cache (drop --no-kv-cache)")
            check_decode_step(decode_step, self.stepper)
        self.decode_step = decode_step
        """How the steps after the prompt run: static_decode.py (eager, static, cuda-graph)."""
        self._static: StaticDecoder | None = None
        limit = max_positions(cfg)
        self.context = context_length or min(cfg.seq_length, limit)
        if self.context > limit:
            raise ValueError(f"context length {self.context} > the model's position table ({limit} rows)")
        self.masks = VocabMasks(layout, cfg.padded_vocab_size)
        self.format = layout.format
        self.grid = self.format.default_grid
        """Latent grid (h, w) of generated images (the layout's default; Emu3 writes it into the tokens)."""
        self.steps = 0

    # ------------------------------------------------------------------ entry
    def generate(self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int,
                 on_step: Callable[[int], None] | None = None) -> list[Generation]:
        """Generate for every prompt (token ids); returns one `Generation` per prompt, in order."""
        self.check_prompts(prompts, max_new_tokens)
        gen = torch.Generator().manual_seed(params.seed)
        rows = [self._new_row(p, max_new_tokens) for p in prompts]
        use_cfg = params.cfg_scale != 1.0
        slots, start, n = self._prefill(prompts, rows, use_cfg, max(r.budget for r in rows))
        cache = KVCache(slots.capacity)
        self.steps, self._static = 0, None
        while True:
            logits = self._run(slots, cache, start, n)
            self._advance(rows, logits, params, use_cfg, gen, slots)
            self.steps += 1
            if on_step is not None:
                on_step(sum(r.state != DONE for r in rows))
            if all(r.state == DONE for r in rows):
                return [r.out for r in rows]
            start, n = self._feed(rows, slots, use_cfg), 1

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Clear errors before any generation: empty prompts, ids outside the vocabulary, no room left."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if not prompts:
            raise ValueError("no prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            self.layout.check_ids(p, f"prompt {i}")
            if len(p) >= self.context:
                raise ValueError(f"prompt {i} has {len(p)} tokens but the context holds {self.context} "
                                 f"(at least one new token must fit)")

    # ------------------------------------------------------------------ rows
    def _new_row(self, prompt: list[int], max_new_tokens: int) -> _Row:
        budget = min(max_new_tokens, self.context - len(prompt))
        state = IMAGE if prompt[-1] == self.layout.break_id else TEXT
        need = self.format.image_length(self.grid) - 1
        if state == IMAGE and budget < need:
            raise ValueError(f"a prompt ending with <break> starts an image of {need} "
                             f"tokens, but only {budget} new tokens fit (max_new_tokens / context)")
        plan = self.format.plan(self.grid).tolist() if state == IMAGE else []
        return _Row(state=state, budget=budget, position=len(prompt), out=Generation(prompt_ids=list(prompt)),
                    plan=plan)

    def _prefill(self, prompts, rows, use_cfg: bool, max_budget: int):
        """Left-padded prompts (and `<sentinel:0>` [`<break>`] unconditional rows); returns (slots, start, n)."""
        b, width = len(prompts), max(len(p) for p in prompts)
        total = 2 * b if use_cfg else b
        slots = SlotTable(total, width + max_budget)
        tokens = torch.zeros(total, width, dtype=torch.long)
        valid = torch.zeros(total, width, dtype=torch.bool)
        positions = torch.zeros(total, width, dtype=torch.long)
        seqs = list(prompts)
        if use_cfg:
            mask, brk = unconditional_id(self.layout), self.layout.break_id
            seqs += [[mask, brk] if r.state == IMAGE else [mask] for r in rows]
        for i, seq in enumerate(seqs):
            tokens[i, width - len(seq):] = torch.tensor(seq)
            valid[i, width - len(seq):] = True
            positions[i, width - len(seq):] = torch.arange(len(seq))
        for i, r in enumerate(rows):
            if use_cfg and r.state == IMAGE:
                r.uncond_break_slot, r.uncond_position = width - 1, 2
        return slots, slots.add(tokens, positions, valid), width

    def _run(self, slots: SlotTable, cache: KVCache, start: int, n: int) -> torch.Tensor:
        if self.use_cache and n == 1 and self.decode_step != "eager" and cache.names():  # after the prefill
            if self._static is None:
                self._static = StaticDecoder(self.stepper, slots, cache, self.decode_step)
            return self._static.step(slots, start)
        if self.use_cache:
            return self.stepper.step(slots, cache, start, n)
        return self.stepper.step(slots, KVCache(slots.capacity), 0, slots.length)  # the whole history again

    # --------------------------------------------------------------- choose
    def _advance(self, rows: list[_Row], logits: torch.Tensor, params: SamplingParams, use_cfg: bool,
                 gen: torch.Generator, slots: SlotTable) -> None:
        """Sample one id for every live row (batched per mode), then move each row's state."""
        b = len(rows)
        chosen = torch.zeros(b, dtype=torch.long)
        for mode in (TEXT, IMAGE, AFTER_IMAGE):
            idx = [i for i, r in enumerate(rows) if r.state == mode]
            if mode == IMAGE:  # structural slots (Emu3's size, end-of-line, ...) are forced, not sampled
                for i in idx:
                    if rows[i].plan[rows[i].image_count] != SAMPLE:
                        chosen[i] = rows[i].plan[rows[i].image_count]
                idx = [i for i in idx if rows[i].plan[rows[i].image_count] == SAMPLE]
            if not idx:
                continue
            lg = self._mode_logits(mode, rows, idx, logits, params, use_cfg)
            image = mode == IMAGE
            chosen[idx] = sample(lg, params.image_temperature if image else params.temperature,
                                 params.image_top_p if image else params.top_p, gen)
        chosen = _tp_broadcast(chosen)
        for i, r in enumerate(rows):
            if r.state != DONE:
                self._transition(r, int(chosen[i]), i + b if use_cfg else -1, slots)

    def _mode_logits(self, mode, rows, idx, logits, params, use_cfg) -> torch.Tensor:
        lg = logits[idx]
        m = self.masks
        if mode == IMAGE:
            if use_cfg:
                lg = cfg_combine(lg, logits[[i + len(rows) for i in idx]], params.cfg_scale)
            return restrict(lg, m.image)
        if mode == AFTER_IMAGE:
            allowed = torch.stack([m.eos | (m.break_ if rows[i].budget >= 2 else torch.zeros_like(m.eos))
                                   for i in idx])
            return restrict(lg, allowed)
        need = self.format.image_length(self.grid)  # never open an image that cannot be finished
        allowed = torch.stack([m.text_mode(allow_break=rows[i].budget >= need and not rows[i].after_break,
                                           allow_eos=not rows[i].after_break) for i in idx])
        return restrict(lg, allowed)

    def _transition(self, r: _Row, tok: int, uncond_row: int, slots: SlotTable) -> None:
        lay = self.layout
        r.out.ids.append(tok)
        r.budget -= 1
        if r.state == TEXT:
            if tok == lay.break_id:
                r.state, r.image_count, r.plan = IMAGE, 0, self.format.plan(self.grid).tolist()
            elif tok == lay.eos_id:
                r.state, r.out.finish_reason = DONE, "eos"
            r.after_break = False
        elif r.state == IMAGE:
            r.image_count += 1
            if r.image_count == len(r.plan):
                r.state = TEXT if self.format.ends_in_text else AFTER_IMAGE
                if uncond_row >= 0 and r.uncond_break_slot >= 0:  # forget this image's <break> + tokens
                    slots.invalidate(uncond_row, r.uncond_break_slot, slots.length)
                    r.uncond_break_slot, r.uncond_position = -1, 1
        elif r.state == AFTER_IMAGE:
            if tok == lay.break_id:
                r.state, r.after_break = TEXT, True
            else:
                r.state, r.out.finish_reason = DONE, "eos"
        if r.state != DONE and r.budget == 0:
            r.state, r.out.finish_reason = DONE, "length"

    # ----------------------------------------------------------------- feed
    def _feed(self, rows: list[_Row], slots: SlotTable, use_cfg: bool) -> int:
        """Append one slot per row: each live row's last id (and, in IMAGE mode, its unconditional row's)."""
        b = len(rows)
        total = 2 * b if use_cfg else b
        tokens = torch.zeros(total, 1, dtype=torch.long)
        positions = torch.zeros(total, 1, dtype=torch.long)
        valid = torch.zeros(total, 1, dtype=torch.bool)
        start = slots.length
        for i, r in enumerate(rows):
            if r.state == DONE:
                continue
            tok = r.out.ids[-1]
            tokens[i, 0], positions[i, 0], valid[i, 0] = tok, r.position, True
            r.position += 1
            if use_cfg and r.state == IMAGE:  # the unconditional row reads <break> and the image so far
                u = b + i
                if r.image_count == 0:
                    r.uncond_break_slot, r.uncond_position = start, 1
                tokens[u, 0], positions[u, 0], valid[u, 0] = tok, r.uncond_position, True
                r.uncond_position += 1
        return slots.add(tokens, positions, valid)


def _tp_broadcast(tokens: torch.Tensor) -> torch.Tensor:
    """Every tensor-parallel rank takes the first rank's ids (they agree already; this makes it certain)."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        from megatron_jam.parallel.state import comm_device

        on_comm = tokens.to(comm_device())  # NCCL broadcasts GPU tensors only
        dist.broadcast(on_comm, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
        return on_comm.cpu()
    return tokens


def unconditional_id(layout: VocabLayout) -> int:
    """The token that stands for the whole prompt in the unconditional row: CM3's `<sentinel:0>`."""
    if layout.num_sentinels < 1:
        raise ValueError("classifier-free guidance needs a CM3 sentinel for its unconditional context, but the "
                         "vocabulary layout has num_sentinels=0; use --cfg-scale 1")
    return layout.sentinel_id(0)


def check_layout_matches_model(layout: VocabLayout, cfg) -> None:
    """Every id of the layout must have an embedding row (a model trained from a config may have more rows,
    which the vocabulary masks never allow)."""
    if layout.vocab_size > cfg.vocab_size:
        raise ValueError(f"vocabulary layout has {layout.vocab_size} ids (text {layout.text_vocab_size}, image "
                         f"codes {layout.codebook_size}, ...) but the checkpoint's model has vocab_size="
                         f"{cfg.vocab_size}: this layout is not the one the model was built with")
