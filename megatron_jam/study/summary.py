"""Every measured number of a study run, read from the run's own files, into ``summary.json``.

Why a summary file: the report must not hold a number that no tool wrote. The
tools write ``eval_text.json`` / ``eval_image.json`` (tools/evaluate.py),
``prompt_following.json`` (tools/evaluate_generation.py), ``metrics.jsonl`` (the
trainer) and ``params.json``; the runner writes ``timings.json``. This module only
reads them, takes means and spreads over seeds and checks the paper's claims; the
report then formats ``summary.json`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
from typing import Dict, List, Optional


METRICS = ("text_ppl", "image_ppl", "accuracy", "params", "train_seconds", "final_loss")
PARENT = "img-parent"
"""The image-text parent's row (paper Table 2's CM3leon)."""
LLM_PARENT = "llm-parent"
"""The text LLM parent's row (text PPL only: it has no image rows)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """One finding of the paper: `better` has a lower `metric` than every model in `than`."""

    table: str
    text: str
    metric: str
    better: str
    than: tuple


CLAIMS = (
    Claim("2", "JAM-Cross has the lowest image-text PPL of the three fusion methods", "image_ppl", "cross-k2",
          ("uniform", "width-copy")),
    Claim("2", "JAM-Width has a lower image-text PPL than JAM-Uniform", "image_ppl", "width-copy", ("uniform",)),
    Claim("2", "JAM-Cross surpasses its image-text parent on image-text PPL", "image_ppl", "cross-k2", (PARENT,)),
    Claim("1", "JAM-Cross keeps text best: the lowest text PPL of the three fusion methods (section 3.2.1)",
          "text_ppl", "cross-k2", ("uniform", "width-copy")),
    Claim("3", "copy initialisation beats average on text PPL", "text_ppl", "width-copy", ("width-average",)),
    Claim("3", "copy initialisation beats average on image-text PPL", "image_ppl", "width-copy", ("width-average",)),
    Claim("4", "cross blocks every 2 layers give the lowest text PPL (vs every 1 and every 4)", "text_ppl",
          "cross-k2", ("cross-k1", "cross-k4")),
    Claim("4", "cross blocks every 2 layers give the lowest image-text PPL (vs every 1 and every 4)", "image_ppl",
          "cross-k2", ("cross-k1", "cross-k4")),
    Claim("5", "mixing image-text pretraining data into instruction tuning keeps image-text PPL lower",
          "image_ppl", "instruct-mixed", ("instruct-only",)),
)


def _read(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def final_loss(metrics_path: str) -> Optional[float]:
    """The last logged training loss (all tokens) of a run's metrics.jsonl."""
    last = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("lm_loss") is not None and "valid_set" not in rec:
                    last = rec["lm_loss"]
    return last


def measure(folder: str, params_folder: str, seconds: Optional[float]) -> dict:
    """One model's numbers: PPL of all tokens of each held-out set, joint prompt accuracy per scale."""
    text, image = _read(os.path.join(folder, "eval_text.json")), _read(os.path.join(folder, "eval_image.json"))
    gen = _read(os.path.join(folder, "prompt_following.json"))
    params = _read(os.path.join(params_folder, "params.json"))
    return {"text_ppl": text and text["ppl"]["all"], "image_ppl": image and image["ppl"]["all"],
            "accuracy": gen and {scale: r["joint_accuracy"] for scale, r in gen["results"].items()},
            "params": params and params["params"], "train_seconds": seconds,
            "final_loss": final_loss(os.path.join(folder, "metrics.jsonl"))}


def _aggregate(per_seed: Dict[str, dict]) -> tuple:
    """(mean, std) per metric over seeds; accuracy per scale; std is None with one seed."""
    mean, std = {}, {}
    for m in METRICS:
        values = [r[m] for r in per_seed.values() if r.get(m) is not None]
        if m == "accuracy":
            scales = sorted({s for v in values for s in v}, key=float)
            series = {s: [v[s] for v in values if s in v] for s in scales}
            mean[m] = {s: statistics.fmean(x) for s, x in series.items()}
            std[m] = {s: statistics.stdev(x) if len(x) > 1 else None for s, x in series.items()}
        else:
            mean[m] = statistics.fmean(values) if values else None
            std[m] = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def collect_models(out: str, seeds: List[int], names: List[str], timings: dict) -> Dict[str, dict]:
    """Every trained model's per-seed numbers with their mean and spread (plus the image-text parent)."""
    models = {}
    img, llm = os.path.join(out, "work", "img"), os.path.join(out, "work", "llm")
    per = {LLM_PARENT: {"parent": measure(llm, llm, timings.get("train_llm_parent"))},
           PARENT: {"parent": measure(img, img, timings.get("train_img_parent"))}}
    for name in names:
        per[name] = {}
        for seed in seeds:
            base = os.path.join(out, "variants", str(seed), name)
            params = os.path.join(base, "init" if os.path.isdir(os.path.join(base, "init")) else "train")
            per[name][str(seed)] = measure(os.path.join(base, "train"), params, timings.get(f"{seed}/{name}/train"))
    for name, rows in per.items():
        mean, std = _aggregate(rows)
        models[name] = {"seeds": rows, "mean": mean, "std": std}
    return models


def check_claims(models: Dict[str, dict], seeds: List[int]) -> List[dict]:
    """Each paper claim on the seed means, and in how many seeds it holds on its own."""
    out = []
    for c in CLAIMS:
        def holds(get) -> Optional[bool]:
            b, others = get(c.better), [get(t) for t in c.than]
            if b is None or not others or any(o is None for o in others):
                return None
            return all(b < o for o in others)

        def seed_value(name: str, seed: str):
            if name not in models:
                return None
            rows = models[name]["seeds"]
            return (rows.get(seed) or rows.get("parent") or {}).get(c.metric)

        per_seed = [holds(lambda n, s=str(s): seed_value(n, s)) for s in seeds]
        out.append({"table": c.table, "claim": c.text, "metric": c.metric, "better": c.better, "than": list(c.than),
                    "held": holds(lambda n: models[n]["mean"][c.metric] if n in models else None),
                    **_margin(models, c),
                    "seeds_held": sum(1 for h in per_seed if h), "seeds": len(seeds)})
    return out


def _margin(models: Dict[str, dict], c: Claim) -> dict:
    """How far apart the claim's models are (`better` minus the best of `than`, on the means; negative when
    the claim holds) and the largest spread over seeds among them: a difference inside it is not a finding."""
    names = [c.better, *c.than]
    if any(n not in models or models[n]["mean"][c.metric] is None for n in names):
        return {"difference": None, "largest_std": None}
    best_other = min(models[n]["mean"][c.metric] for n in c.than)
    stds = [models[n]["std"][c.metric] for n in names if models[n]["std"][c.metric] is not None]
    return {"difference": models[c.better]["mean"][c.metric] - best_other, "largest_std": max(stds) if stds else None}


def write_summary(out: str) -> str:
    """Read the run folder `out`; write and return ``out/summary.json``."""
    cfg = _read(os.path.join(out, "study_config.json"))
    timings = _read(os.path.join(out, "timings.json")) or {}
    models = collect_models(out, cfg["seeds"], cfg["variants"], timings)
    gen = _read(os.path.join(out, "work", "img", "prompt_following.json"))  # every run has it
    summary = {"seeds": cfg["seeds"], "cfg_scales": [str(s) for s in cfg["cfg_scales"]],
               "chance_joint_accuracy": gen and gen["chance"].get("joint_accuracy"),
               "prompts": gen and len({r["name"] for r in gen["rows"]}),
               "models": models, "findings": check_claims(models, cfg["seeds"])}
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path


def write_machine(out: str, cfg, start: float, end: Optional[float], earlier: Optional[dict] = None) -> None:
    """``machine.json`` (CPU count, torch, GPU, start and end, wall time) and ``study_config.json``.

    A resumed study (`earlier`: the stopped run's machine.json) keeps the first start and adds the
    stopped run's wall time to this one's: the wall time is the time spent running, not the pause."""
    import torch

    earlier = earlier or {}
    os.makedirs(out, exist_ok=True)
    when = lambda t: t and datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(  # noqa: E731
        "%Y-%m-%d %H:%M UTC")
    wall = (earlier.get("wall_seconds") or 0) + (end - start) if end else None
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "started": earlier.get("started") or when(start), "finished": when(end),
               "resumed": earlier.get("resumed", -1) + 1 if earlier else 0,
               "wall_seconds": round(wall, 1) if end else None,
               "wall_minutes": round(wall / 60, 1) if end else None}
    with open(os.path.join(out, "machine.json"), "w") as f:
        json.dump(machine, f, indent=1)
    with open(os.path.join(out, "study_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
