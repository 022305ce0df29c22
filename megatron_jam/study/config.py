"""Flags of the study (Megatron-style names) and its two sizes.

Why two sizes: ``--quick`` must finish in under 5 minutes on 2 CPU cores (CI, a
first look), the default in under 30 minutes (the figures in docs/study.md). Every
size flag left unset takes the chosen size's value, so ``--quick --train-iters 80``
changes one thing only. On a GPU, ``--num-layers``/``--hidden-size`` and the step
counts scale the same study up.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import List, Optional

# Per size: world documents, VQ steps, parent steps, variant and instruction steps, evaluation sizes.
SIZES = {
    "quick": dict(text_docs=500, image_text_docs=500, interleaved_docs=100, heldout_docs=120, instruct_docs=120,
                  vq_iters=120, llm_iters=60, img_iters=120, train_iters=40, instruct_iters=20, eval_windows=16,
                  samples_per_prompt=1, cfg_scales=[3.5], seeds=[1234]),
    "default": dict(text_docs=1500, image_text_docs=1500, interleaved_docs=300, heldout_docs=300, instruct_docs=300,
                    vq_iters=600, llm_iters=300, img_iters=600, train_iters=200, instruct_iters=80, eval_windows=64,
                    samples_per_prompt=2, cfg_scales=[1.0, 3.5], seeds=[1234, 1235, 1236]),
}
SIZE_KEYS = tuple(SIZES["quick"])


@dataclasses.dataclass(frozen=True)
class Variant:
    """One JAM model of the study: how the converter builds it from the two parents."""

    name: str
    """Row name in the report (also the folder name under ``<output>/variants/<seed>/``)."""
    convert_args: tuple
    """Flags of tools/convert_checkpoint.py that define the method."""
    tables: tuple
    """The paper tables (2, 3, 4) this variant has a row in."""


VARIANTS = (
    Variant("uniform", ("--method", "uniform", "--llm-weight", "0.5"), (2,)),
    Variant("width-copy", ("--method", "width", "--width-init", "copy"), (2, 3)),
    Variant("width-average", ("--method", "width", "--width-init", "average"), (3,)),
    Variant("cross-k1", ("--method", "cross", "--cross-every", "1"), (4,)),
    Variant("cross-k2", ("--method", "cross", "--cross-every", "2"), (2, 4)),
    Variant("cross-k4", ("--method", "cross", "--cross-every", "4"), (4,)),
)
INSTRUCT_BASE = "cross-k2"
"""The pretrained variant that is instruction-tuned (the paper tunes JAM-Cross)."""
INSTRUCT_VARIANTS = ("instruct-only", "instruct-mixed")
"""Table 5: instruction data alone, and blended 50/50 with image-text pretraining data."""
ALL_NAMES = tuple(v.name for v in VARIANTS) + INSTRUCT_VARIANTS


@dataclasses.dataclass
class StudyConfig:
    """Everything one study run needs; the resolved copy is written to ``<output>/study_config.json``."""

    output: str
    size: str
    seeds: List[int]
    nproc: int
    jobs: int
    num_layers: int
    hidden_size: int
    seq_length: int
    text_docs: int
    image_text_docs: int
    interleaved_docs: int
    heldout_docs: int
    instruct_docs: int
    vq_iters: int
    llm_iters: int
    img_iters: int
    train_iters: int
    instruct_iters: int
    eval_windows: int
    samples_per_prompt: int
    cfg_scales: List[float]
    python: str
    variants: List[str] = dataclasses.field(default_factory=lambda: list(ALL_NAMES))
    """The models to train (default all; a subset for a partial study, e.g. in tests)."""
    command: str = ""
    resume: bool = False
    """Continue a stopped study in the same --output: steps that succeeded are not run again."""
    global_batch: int = 8
    """Sequences per step of every variant and of instruction tuning (the same token budget for all)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_jam.study",
                                description="rerun the JAM paper's ablations (Tables 2-5) at small scale")
    p.add_argument("--quick", action="store_true", help="the CI size: under 5 minutes on 2 CPU cores")
    p.add_argument("--output", default="runs/study", help="run folder (report.md, summary.json, work/)")
    p.add_argument("--resume", action="store_true", help="continue a stopped study in --output (same flags): "
                   "the steps that succeeded are not run again")
    p.add_argument("--seed", type=int, help="one seed (same as --seeds N)")
    p.add_argument("--seeds", type=int, nargs="+", help="variant seeds; several give the spread (default: per size)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training job (data parallel; GPUs per job)")
    p.add_argument("--jobs", type=int, default=2, help="independent jobs run at once (2 on a 2-core CPU, 1 on a GPU)")
    p.add_argument("--num-layers", type=int, default=4, help="layers of each parent (a multiple of 4: k=4)")
    p.add_argument("--hidden-size", type=int, default=64, help="hidden size of each parent (a multiple of 4)")
    p.add_argument("--seq-length", type=int, default=128)
    for key in SIZE_KEYS:
        if key in ("seeds", "cfg_scales"):
            continue
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"default: {SIZES['default'][key]} "
                       f"({SIZES['quick'][key]} with --quick)")
    p.add_argument("--cfg-scales", type=float, nargs="+", help="guidance scales of the prompt-following score")
    p.add_argument("--variants", nargs="+", choices=ALL_NAMES, default=list(ALL_NAMES),
                   help="train only these models (a partial study; instruction tuning needs cross-k2)")
    p.add_argument("--python", default=None, help="interpreter for the tools (default: this one)")
    return p


def resolve(args: argparse.Namespace, python: str, command: str) -> StudyConfig:
    """The flags with every unset size key taken from the chosen size; checks what would fail late."""
    size = "quick" if args.quick else "default"
    values = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in SIZES[size].items()}
    if args.seed is not None:
        values["seeds"] = [args.seed]
    if args.num_layers % 4 or args.num_layers < 4:
        raise ValueError(f"--num-layers {args.num_layers}: must be a multiple of 4 (cross blocks every k=1, 2, 4)")
    if args.hidden_size % 4:
        raise ValueError(f"--hidden-size {args.hidden_size}: must be a multiple of 4 (4 attention heads)")
    if args.nproc < 1 or 8 % args.nproc:
        raise ValueError(f"--nproc {args.nproc}: must divide the global batch of 8")
    if set(args.variants) & set(INSTRUCT_VARIANTS) and INSTRUCT_BASE not in args.variants:
        raise ValueError(f"--variants: instruction tuning starts from {INSTRUCT_BASE}; add it")
    return StudyConfig(output=args.output, variants=[n for n in ALL_NAMES if n in args.variants], size=size,
                       nproc=args.nproc, jobs=max(1, args.jobs), resume=args.resume,
                       num_layers=args.num_layers, hidden_size=args.hidden_size, seq_length=args.seq_length,
                       python=args.python or python, command=command, **values)


def parse(argv: Optional[List[str]], python: str, command: str) -> StudyConfig:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        return resolve(args, python, command)
    except ValueError as e:
        p.error(str(e))
