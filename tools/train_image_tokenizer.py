"""Train a tiny VQ image tokenizer (a `transformers` `JanusVQVAE`) on CPU for the demo flow.

    python tools/train_image_tokenizer.py --input data/shapes/docs.jsonl --save checkpoints/vq_tiny
    python tools/train_image_tokenizer.py --input 'pictures/*.png' more_pictures/ --save vq \
        --image-size 32 --tokens-per-image 16 --codebook-size 256 --train-iters 1000

Inputs are JSON Lines files in the preprocessing format (``{"content": [{"text": ...},
{"image": "images/x.png"}]}``, image paths relative to the JSONL file's folder or absolute),
image files, globs or folders (searched recursively for images). The result is a
`save_pretrained` folder that `--image-tokenizer` accepts everywhere (preprocessing,
generation), plus ``training_summary.json``: held-out reconstruction MSE before and after
training, codebook usage and timings (also printed as one JSON line).

Errors in what you pass directly (a missing or unreadable image, no images at all) stop
the run with a one-line message naming the file and exit code 2; unreadable images
referenced from JSONL files are skipped and counted.
"""

import argparse
import glob
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, run_cli  # noqa: E402  (light: no torch)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="train a tiny JanusVQVAE image tokenizer on CPU")
    g = p.add_argument_group("data")
    g.add_argument("--input", nargs="+", action="extend", required=True,
                   help="JSONL files (preprocessing format), image files, globs or folders")
    g.add_argument("--save", required=True, help="output folder (save_pretrained layout + training_summary.json)")
    ev = g.add_mutually_exclusive_group()
    ev.add_argument("--num-eval-images", type=int, default=64, help="held-out images for reconstruction MSE")
    ev.add_argument("--eval-fraction", type=float, default=None, help="held-out fraction instead of a count")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=32, help="square input resolution in pixels")
    g.add_argument("--tokens-per-image", type=int, default=16,
                   help="codes per image; a square whose side divides --image-size by a power of two")
    g.add_argument("--codebook-size", type=int, default=256)
    g.add_argument("--base-channels", type=int, default=32, help="a multiple of 32 (GroupNorm groups)")
    g.add_argument("--num-res-blocks", type=int, default=0,
                   help="residual blocks per encoder level (decoder: one more); 0 is twice as fast on CPU")
    g.add_argument("--embed-dim", type=int, default=8, help="codebook vector size")
    g.add_argument("--latent-channels", type=int, default=32)
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=1000)
    g.add_argument("--micro-batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=5e-3, help="peak Adam learning rate (warm-up, cosine to 10%%)")
    g.add_argument("--restart-interval", type=int, default=25,
                   help="re-seed codes unused for this many iterations from recent encoder outputs (0: never)")
    g.add_argument("--foreground-weight", type=float, default=1.5,
                   help="extra reconstruction weight on figure pixels (not the background); 0: plain loss")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_debug_arg(p)
    return p


def _expand(spec: str) -> list:
    """One --input entry -> sorted file paths (a glob, a folder searched recursively for images, or a file)."""
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise InputError(f"--input {spec}: no files match")
        return paths
    if os.path.isdir(spec):
        found = sorted(os.path.join(root, f) for root, _, files in os.walk(spec) for f in files
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise InputError(f"--input {spec}: no image files in folder")
        return found
    if not os.path.exists(spec):
        raise InputError(f"--input {spec}: no such file")
    return [spec]


def jsonl_image_paths(path: str) -> tuple:
    """Image paths referenced by a preprocessing-format JSONL file, and the count of unusable lines."""
    paths, bad_lines = [], 0
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                content = json.loads(line).get("content", [])
                images = [item["image"] for item in content if isinstance(item, dict) and "image" in item]
            except (ValueError, AttributeError, TypeError):
                bad_lines += 1
                continue
            paths.extend(p if os.path.isabs(p) else os.path.join(folder, p) for p in images if isinstance(p, str))
    return paths, bad_lines


def load_inputs(specs: list) -> tuple:
    """PIL images from all inputs and counts of what was skipped; direct image errors raise InputError."""
    from megatron_jam.data.image_tokenizer import ImageError, load_image

    images, skipped = [], {"unreadable_images": 0, "malformed_lines": 0}
    for spec in specs:
        for path in _expand(spec):
            if path.lower().endswith((".jsonl", ".json")):
                refs, bad = jsonl_image_paths(path)
                skipped["malformed_lines"] += bad
                for ref in refs:
                    try:
                        images.append(load_image(ref))
                    except ImageError:
                        skipped["unreadable_images"] += 1
            else:
                try:
                    images.append(load_image(path))
                except ImageError as e:
                    raise InputError(f"--input {path}: {e.reason} ({e.detail})") from e
    if not images:
        raise InputError(f"--input {' '.join(specs)}: no usable images found "
                         f"({skipped['unreadable_images']} unreadable images skipped)")
    return images, skipped


def split_images(images: list, args) -> tuple:
    """Seeded shuffle, then (train, eval); at least one training image is always kept."""
    order = list(range(len(images)))
    random.Random(args.seed).shuffle(order)
    wanted = round(len(images) * args.eval_fraction) if args.eval_fraction is not None else args.num_eval_images
    n_eval = max(0, min(wanted, len(images) - 1))
    return [images[i] for i in order[n_eval:]], [images[i] for i in order[:n_eval]]


def check_args(args) -> None:
    from megatron_jam.data.vq_training import latent_side

    latent_side(args.image_size, args.tokens_per_image)
    for name in ("train_iters", "micro_batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.foreground_weight < 0:
        raise InputError("--foreground-weight must be at least 0")
    if args.eval_fraction is not None and not 0 <= args.eval_fraction < 1:
        raise InputError("--eval-fraction must be in [0, 1)")


def run(args) -> dict:
    """Load images, train, save; returns the summary."""
    import torch

    from megatron_jam.data import vq_training
    from megatron_jam.utils.logging import get_logger

    logger = get_logger("tools.train_image_tokenizer")
    start = time.time()
    check_args(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    images, skipped = load_inputs(args.input)
    train_images, eval_images = split_images(images, args)
    logger.info("%d training images, %d held out; skipped %d unreadable images, %d malformed JSONL lines",
                len(train_images), len(eval_images), skipped["unreadable_images"], skipped["malformed_lines"])
    model = vq_training.build_model(args.image_size, args.tokens_per_image, args.codebook_size, args.base_channels,
                                    args.embed_dim, args.latent_channels, args.num_res_blocks, args.seed)
    train_pixels = vq_training.pixels_from_images(train_images, args.image_size)
    eval_pixels = vq_training.pixels_from_images(eval_images, args.image_size) if eval_images else \
        torch.zeros(0, 3, args.image_size, args.image_size)

    def log(d):
        logger.info("iteration %d/%d | loss %.4f | codes in batch %d/%d | lr %.2e | %.1f s", d["iteration"],
                    args.train_iters, d["loss"], d["codes_in_batch"], args.codebook_size, d["lr"], d["seconds"])

    summary = vq_training.train(model, train_pixels, eval_pixels, args.train_iters, args.micro_batch_size, args.lr,
                                args.seed, args.log_interval, args.restart_interval,
                                foreground_weight=args.foreground_weight, on_log=log)
    vq_training.save(model, args.save)
    summary.update(save=args.save, image_size=args.image_size, tokens_per_image=args.tokens_per_image,
                   skipped=skipped, total_seconds=round(time.time() - start, 2))
    with open(os.path.join(args.save, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=(InputError, ValueError))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
