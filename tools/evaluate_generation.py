"""Prompt following of generated images: text-to-image over a prompt set, scored, at several guidance scales.

    python tools/evaluate_generation.py --load runs/jam-cross-tiny --tokenizer-model world/spm.model \
        --image-tokenizer world/vq --prompts-file world/prompts.jsonl --cfg-scale 1 2 3.5 5 \
        --samples-per-prompt 4 --output runs/jam-cross-tiny/prompt_following.json
    python tools/evaluate_generation.py ... --prompts-file coco_prompts.jsonl --clip-model clip-vit-b-32/

Prompt lines are `{"prompt": TEXT, "name"?, "colour"?, "shape"?}`. With colour and shape
(the picture world's prompts.jsonl) each decoded image is read back by the exact attribute
reader (accuracy per attribute and joint, next to chance); with --clip-model the score is
CLIP score. Every scale uses the same prompts and seeds. Writes one JSON file (summary per
scale and one row per image); --save-images keeps the PNGs. See docs/generation.md.

Retrieval-augmented, as tools/generate_interleaved.py: --retrieval-index INDEX --retrieval-k 2
prepends each prompt's retrieved bank documents (each row lists their ids and scores); the CLIP
folder that embeds the prompt is --retrieval-clip-model (default: the index's), apart from the
scorer's --clip-model.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="prompt following of generated images (attribute accuracy or CLIP score)")
    p.add_argument("--load", required=True, help="checkpoint folder (converted or trained)")
    p.add_argument("--vocab-layout", help="the dataset's PREFIX.vocab.json (default: vocab_layout.json in --load)")
    p.add_argument("--tokenizer-model", help="the text tokenizer the layout was built with (sentencepiece .model, "
                                             "or a tokenizer.json or its folder; default: the --load folder's "
                                             "tokenizer/)")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"),
                   help="default: inferred from --tokenizer-model")
    p.add_argument("--image-tokenizer", help="VQ tokenizer folder with a decoder (default: the --load folder's "
                                             "image_tokenizer/)")
    p.add_argument("--prompts-file", required=True, help="JSON Lines prompt set (picture world: prompts.jsonl)")
    p.add_argument("--clip-model", help="local transformers CLIP folder: score with CLIP instead of attributes")
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[1.0, 2.0, 3.5, 5.0],
                   help="guidance scales to compare (1 = no guidance)")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--image-temperature", type=float, default=1.0)
    p.add_argument("--image-top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=64, help="images decoded together")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--output", required=True, help="JSON file with the summary and one row per image")
    p.add_argument("--save-images", help="folder for the decoded PNGs (SCALE/NAME_K.png)")
    p.add_argument("--no-progress-bar", action="store_true")
    r = p.add_argument_group("retrieval augmentation, as tools/generate_interleaved.py (docs/generation.md)")
    r.add_argument("--retrieval-index", help="index of tools/build_retrieval_index.py: each prompt's retrieved "
                                             "bank documents are prepended to it")
    r.add_argument("--retrieval-k", type=int, default=None, help="documents retrieved per prompt (default 2)")
    r.add_argument("--retrieval-max-score", type=float, default=0.9, help="skip candidates scoring above it")
    r.add_argument("--retrieval-clip-model", help="CLIP folder that embeds the prompt (default: the index's; "
                                                  "--clip-model is the scorer's)")
    add_debug_arg(p)
    return p


def setup(args):
    """Everything that can fail before the model is built: (cfg, layout, tokenizer, vq, items, requests)."""
    from megatron_jam.inference.loading import check_checkpoint_layout, load_tokenizers, resolve_layout
    from megatron_jam.inference.prompt_following import make_scorer, read_prompt_set
    from megatron_jam.inference.retrieval_context import check_retrieval_args, read_bank_meta
    from megatron_jam.models.kinds import load_model_config, validate_model_parallel

    if args.samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt {args.samples_per_prompt} must be >= 1")
    if check_retrieval_args(args.retrieval_index, args.retrieval_k, args.retrieval_max_score):
        read_bank_meta(args.retrieval_index)  # a missing index or bank fails before anything is loaded
    cfg = load_model_config(args.load)
    validate_model_parallel(cfg, tp=args.tensor_model_parallel_size, pp=1)
    layout = resolve_layout(args.load, args.vocab_layout)
    check_checkpoint_layout(args.load, cfg, layout)
    tok, vq = load_tokenizers(args, layout)  # given, else the run folder's copies
    for flag, found, folder in (("--tokenizer-model", tok, "tokenizer/"),
                                ("--image-tokenizer", vq, "image_tokenizer/")):
        if found is None:
            raise ValueError(f"give {flag}: --load {args.load} carries no {folder} of its vocabulary layout")
    items = read_prompt_set(args.prompts_file)
    scorer = make_scorer(items, args.clip_model)
    prompts = [[int(t) for t in tok.encode(it.prompt)] for it in items]
    retrieved, retrieval = retrieve_contexts(args, cfg, layout, items, prompts)
    requests = [(it, k, ctx.prefix_ids() + ids if ctx is not None else ids, ctx)
                for it, ids, ctx in zip(items, prompts, retrieved) for k in range(args.samples_per_prompt)]
    return cfg, layout, vq, scorer, requests, retrieval


def retrieve_contexts(args, cfg, layout, items, prompts):
    """([RetrievedContext or None per prompt], run settings or None): with --retrieval-index, the bank
    documents each prompt retrieves, to prepend; the room left for them keeps `<break>` + one image."""
    from megatron_jam.inference.retrieval_context import open_retriever
    from megatron_jam.inference.stepper import max_positions

    retriever = open_retriever(args, layout)
    if retriever is None:
        return [None] * len(items), None
    context = min(cfg.seq_length, max_positions(cfg))
    image = layout.format.image_length(layout.format.default_grid)  # the break and the image's tokens
    found = retriever.contexts([it.prompt for it in items], [len(p) for p in prompts], context, image)
    return found, retriever.describe()


def run(args) -> dict:
    import torch.distributed as dist
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.loading import load_model
    from megatron_jam.inference.prompt_following import summarise, text_to_image
    from megatron_jam.inference.sampling import SamplingParams
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
    from megatron_jam.utils.progress import progress

    cfg, layout, vq, scorer, requests, retrieval = setup(args)
    initialize_distributed()
    if dist.get_world_size() != args.tensor_model_parallel_size:
        raise ValueError(f"run with {args.tensor_model_parallel_size} processes (one per TP rank)")
    initialize_model_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
    model, cfg = load_model(args.load, args.tensor_model_parallel_size)
    gen = InterleavedGenerator(model, cfg, layout)
    rows = []
    bar = progress(total=len(args.cfg_scale) * len(requests), desc="images", unit="img",
                   enabled=not args.no_progress_bar and dist.get_rank() == 0)
    for scale in args.cfg_scale:
        for b in range(0, len(requests), args.batch_size):
            batch = requests[b: b + args.batch_size]
            params = SamplingParams(image_temperature=args.image_temperature, image_top_p=args.image_top_p,
                                    cfg_scale=scale, seed=args.seed + b)  # the same seeds at every scale
            images, codes = text_to_image(gen, vq, [ids for _, _, ids, _ in batch], params, layout.break_id)
            for (item, k, _, ctx), image, c in zip(batch, images, codes):
                row = {"cfg_scale": scale, "name": item.name, "sample": k, "prompt": item.prompt, "codes": c}
                row |= {"retrieved": ctx.record()} if ctx is not None else {}
                row |= scorer.row(item, image)
                if args.save_images:
                    row["file"] = _save(image, args.save_images, scale, item.name, k)
                rows.append(row)
            bar.update(len(batch))
    bar.close()
    return {"load": args.load, "prompts_file": args.prompts_file, "scorer": scorer.kind, "chance": scorer.chance,
            "samples_per_prompt": args.samples_per_prompt, "seed": args.seed, "image_top_p": args.image_top_p,
            "image_temperature": args.image_temperature, "retrieval": retrieval, "results": summarise(scorer, rows),
            "rows": rows}


def _save(image, folder: str, scale: float, name: str, k: int) -> str:
    sub = os.path.join(folder, f"cfg{scale:g}")
    os.makedirs(sub, exist_ok=True)
    path = os.path.join(sub, f"{name}_{k}.png")
    image.save(path)
    return path


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
    record = run(args)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps({"output": args.output, "scorer": record["scorer"], "chance": record["chance"],
                          "results": record["results"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
