"""Generate interleaved text-and-image documents with a JAM checkpoint (paper section 3.1 decoding).

    python tools/generate_interleaved.py --load ckpt/cross --vocab-layout shards/mix.vocab.json \
        --tokenizer-model llama/tokenizer.model --image-tokenizer checkpoints/janus_vq \
        --prompt "How to brew green tea?" --cfg-scale 3.5 --top-p 0.9 --image-top-p 0.9 --output out/
    torchrun --nproc-per-node 2 tools/generate_interleaved.py --load ckpt/cross ... \
        --prompts-file prompts.jsonl --tensor-model-parallel-size 2 --output out/

Retrieval-augmented (paper section 3.1): --retrieval-index INDEX (tools/build_retrieval_index.py)
--retrieval-k 2 retrieves bank documents with the prompt's CLIP embedding and prepends them
(megatron_jam/inference/retrieval_context.py).

Writes, per prompt, NAME.html and NAME.md (text with the images inline; retrieved documents
shown apart, as what the model saw), NAME.json (raw ids, segment boundaries, retrieved bank
ids and scores) and NAME_imgK.png. Every input is checked before any generation (exit code 2).
See tools/README.md and docs/generation.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="mixed-modal generation with classifier-free guidance")
    p.add_argument("--load", required=True, help="checkpoint folder (converted or trained)")
    p.add_argument("--ckpt-step", type=int, default=None, help="a training folder's iteration (default: latest)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompts-file", help='JSON Lines: {"prompt": TEXT} or {"prompt_ids": [ids]}, '
                                          'optional "name", "start_with_image"')
    p.add_argument("--vocab-layout", help="the dataset's PREFIX.vocab.json (default: vocab_layout.json in --load)")
    p.add_argument("--tokenizer-model", help="sentencepiece .model file, or a Hugging Face tokenizer.json (or its "
                                             "folder); needed for text prompts and readable text (default: the "
                                             "--load folder's tokenizer/, when it carries one)")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"),
                   help="default: inferred from --tokenizer-model")
    p.add_argument("--image-tokenizer", help="VQ tokenizer folder; images are decoded when it has a decoder "
                                             "(default: the --load folder's image_tokenizer/, when it carries one)")
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=3.5, help="alpha of eq. 6 for image tokens; 1 = off")
    g.add_argument("--temperature", type=float, default=1.0, help="text tokens; 0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, help="text nucleus")
    g.add_argument("--image-temperature", type=float, default=1.0, help="image tokens; 0 = greedy")
    g.add_argument("--image-top-p", type=float, default=0.9, help="image nucleus")
    g.add_argument("--greedy", action="store_true", help="temperature 0 for text and images")
    g.add_argument("--max-new-tokens", type=int, default=1536)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--start-with-image", action="store_true", help="append <break>: every prompt starts an image")
    g.add_argument("--context-length", type=int, help="default: the model's seq_length")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every token (slow)")
    g.add_argument("--decode-step", choices=("eager", "static", "cuda-graph"), default="eager",
                   help="how the steps after the prompt run: eager; static (fixed shapes, the whole cache "
                        "attended); cuda-graph (static, captured once per batch and replayed: CUDA, TP 1; "
                        "docs/generation.md)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="must be 1 for generation")
    p.add_argument("--output", required=True, help="folder for the documents")
    p.add_argument("--no-progress-bar", action="store_true")
    r = p.add_argument_group("retrieval augmentation (paper section 3.1; docs/generation.md)")
    r.add_argument("--retrieval-index", help="index of tools/build_retrieval_index.py: the prompt's CLIP embedding "
                                             "retrieves bank documents, prepended to its context")
    r.add_argument("--retrieval-k", type=int, default=None, help="documents retrieved per prompt (default 2)")
    r.add_argument("--retrieval-max-score", type=float, default=0.9,
                   help="skip candidates scoring above it (near duplicates of the prompt)")
    r.add_argument("--clip-model", "--retrieval-clip-model", dest="retrieval_clip_model",
                   help="CLIP folder that embeds the prompt (default: the one the index was built with)")
    add_debug_arg(p)
    return p


def read_prompts(args) -> list[dict]:
    """[{"name", "text" or None, "ids" or None, "start_with_image"}] from --prompt and --prompts-file."""
    items = [{"text": t} for t in args.prompt]
    if args.prompts_file:
        from megatron_jam.utils.jsonl import read_records

        expected = '{"prompt": TEXT} or {"prompt_ids": [...]}'
        for n, rec in read_records(args.prompts_file, expected):
            if not {"prompt", "prompt_ids"} & set(rec):
                raise ValueError(f"{args.prompts_file}:{n}: expected {expected}")
            items.append({"text": rec.get("prompt"), "ids": rec.get("prompt_ids"), "name": rec.get("name"),
                          "start_with_image": bool(rec.get("start_with_image", False))})
    if not items:
        raise ValueError("give --prompt TEXT or --prompts-file FILE")
    for i, it in enumerate(items):
        it.setdefault("ids", None)
        it["name"] = it.get("name") or f"prompt_{i:04d}"
        it["start_with_image"] = it.get("start_with_image", False) or args.start_with_image
    return items


def encode_prompts(items: list[dict], sp, layout) -> None:
    for it in items:
        if it["ids"] is None:
            if sp is None:
                raise ValueError(f"{it['name']}: a text prompt needs --tokenizer-model")
            it["ids"] = sp.encode(it["text"])
        it["ids"] = [int(t) for t in it["ids"]]
        if it["start_with_image"] and (not it["ids"] or it["ids"][-1] != layout.break_id):
            it["ids"].append(layout.break_id)


def retrieve_contexts(args, items: list[dict], sp, layout, context: int) -> None:
    """With --retrieval-index: each prompt's retrieved bank documents, prepended to its ids (it["retrieved"])."""
    from megatron_jam.inference.retrieval_context import open_retriever

    retriever = open_retriever(args, layout)
    if retriever is None:
        return
    texts = [query_text(it, sp, layout) for it in items]
    found = retriever.contexts(texts, [len(it["ids"]) for it in items], context, args.max_new_tokens)
    for it, ctx in zip(items, found):
        it["retrieved"], it["retrieval"] = ctx, retriever.describe()
        it["ids"] = ctx.prefix_ids() + it["ids"]


def query_text(item: dict, sp, layout) -> str:
    """The text CLIP embeds for retrieval: the prompt text, or its ids decoded."""
    if item["text"] is not None:
        return item["text"]
    if sp is None:
        raise ValueError(f"{item['name']}: retrieval needs the prompt as text (or --tokenizer-model to decode ids)")
    return sp.decode([t for t in item["ids"] if layout.is_text(t)])


def setup(args):
    """Everything that can fail, checked before the model is built: returns (cfg, layout, sp, vq, items)."""
    from megatron_jam.inference.loading import check_checkpoint_layout, load_tokenizers, resolve_layout
    from megatron_jam.inference.retrieval_context import check_retrieval_args, read_bank_meta
    from megatron_jam.inference.sampling import SamplingParams
    from megatron_jam.models.kinds import load_model_config, validate_model_parallel

    from megatron_jam.utils.paths import output_dir_problem

    if check_retrieval_args(args.retrieval_index, args.retrieval_k, args.retrieval_max_score):
        read_bank_meta(args.retrieval_index)  # a missing index or bank fails before anything is loaded
    params = sampling_params(args, SamplingParams)
    problem = output_dir_problem(args.output)
    if problem:
        raise ValueError(f"--output {args.output}: {problem}")
    if args.pipeline_model_parallel_size != 1:
        raise ValueError(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: generation needs "
                         "the whole model on one stage; use --tensor-model-parallel-size")
    cfg = load_model_config(args.load)
    validate_model_parallel(cfg, tp=args.tensor_model_parallel_size, pp=1)
    layout = resolve_layout(args.load, args.vocab_layout)
    check_checkpoint_layout(args.load, cfg, layout)
    sp, vq = load_tokenizers(args, layout)  # given, else the run folder's copies (tokenizer/, image_tokenizer/)
    items = read_prompts(args)
    encode_prompts(items, sp, layout)
    from megatron_jam.inference.stepper import max_positions

    context = args.context_length or min(cfg.seq_length, max_positions(cfg))
    if context > max_positions(cfg):
        raise ValueError(f"--context-length {context} > the model's position table ({max_positions(cfg)} rows)")
    if args.context_length and context > cfg.seq_length:  # allowed, never silent: positions it never trained on
        from megatron_jam.utils.logging import get_logger, log_rank0

        log_rank0(get_logger("megatron_jam.tools.generate_interleaved"), "--context-length %d is longer than the "
                  "%d tokens %s records as its training length", context, cfg.seq_length, args.load)
    retrieve_contexts(args, items, sp, layout, context)
    for it in items:
        layout.check_ids(it["ids"], it["name"])
        if len(it["ids"]) >= context:
            raise ValueError(f"{it['name']}: the prompt has {len(it['ids'])} tokens but the context holds "
                             f"{context} (at least one new token must fit)")
    return cfg, layout, sp, vq, items, params, context


def sampling_params(args, cls):
    if args.greedy:
        return cls(temperature=0.0, image_temperature=0.0, cfg_scale=args.cfg_scale, seed=args.seed)
    return cls(temperature=args.temperature, top_p=args.top_p, image_temperature=args.image_temperature,
               image_top_p=args.image_top_p, cfg_scale=args.cfg_scale, seed=args.seed)


def generate(args) -> list[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.loading import load_model
    from megatron_jam.inference.render import DocumentWriter
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
    from megatron_jam.utils.progress import progress

    cfg, layout, sp, vq, items, params, context = setup(args)
    tp = args.tensor_model_parallel_size
    initialize_distributed()
    if dist.get_world_size() % tp:
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by TP={tp}")
    initialize_model_parallel(tp, 1, seed=args.seed)
    model, cfg = load_model(args.load, tp, iteration=args.ckpt_step)
    gen = InterleavedGenerator(model, cfg, layout, context_length=context, use_cache=not args.no_kv_cache,
                               decode_step=args.decode_step)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = items[dp_rank::dp]
    writes = parallel_state.get_tensor_model_parallel_rank() == 0
    writer = DocumentWriter(args.output, layout, sp, vq) if writes else None
    show = writes and dp_rank == 0 and not args.no_progress_bar
    records, full = [], []
    bar = progress(total=len(mine), desc="prompts", unit="prompt", enabled=show)
    for b in range(0, len(mine), args.batch_size):
        batch = mine[b: b + args.batch_size]
        tokens = progress(desc="tokens", unit="step", enabled=show, log_lines=False, leave=False)
        outs = gen.generate([it["ids"] for it in batch], params, args.max_new_tokens,
                            on_step=lambda live: tokens.update(1))
        tokens.close()
        for it, out in zip(batch, outs):
            if writer is not None:
                meta = {"load": args.load, "cfg_scale": params.cfg_scale, "seed": params.seed}
                meta |= {"retrieval": it["retrieval"]} if "retrieval" in it else {}
                rec = writer.write(it["name"], it["text"], out, meta=meta, retrieved=it.get("retrieved"))
                full.append(rec)
                records.append({"name": it["name"], "finish_reason": rec["finish_reason"], "tokens": len(out.ids),
                                "images": sum(s["type"] == "image" for s in rec["segments"])}
                               | ({"retrieved": rec["retrieved"]["ids"]} if "retrieved" in rec else {}))
        bar.update(len(batch))
    bar.close()
    if writer is not None and dp == 1:  # with data parallelism each rank holds only its share
        records.append({"index": writer.write_index(full)})
    return records


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=(ValueError,))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_path("--load", args.load, directory=True)  # the common mistake: one line before Megatron-Core loads
    if args.retrieval_k and not args.retrieval_index:  # before Megatron-Core is imported
        from megatron_jam.models.config import ConfigError

        raise ConfigError(f"--retrieval-k {args.retrieval_k} needs --retrieval-index INDEX "
                          "(built by tools/build_retrieval_index.py)")
    records = generate(args)
    if records:
        index = [r["index"] for r in records if "index" in r]
        summary = {"output": args.output, "documents": [r for r in records if "index" not in r]}
        print(json.dumps(summary | ({"index": index[0]} if index else {}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
