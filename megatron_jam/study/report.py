"""``report.md`` of a study run: one table per paper table, our numbers beside the paper's, findings, plots.

Why it reads only files: every number in the report comes from ``summary.json``
(itself read from the tools' JSON output), ``machine.json``, ``study_config.json``
and the paper's numbers (:mod:`.paper`, written into the run folder as ``paper_tables.json``), so a
test can check each number against the run's own files. Rerun on a finished run:
``python -m megatron_jam.study.report RUN_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import List, Optional

from megatron_jam.study.paper import PAPER
from megatron_jam.study.plots import draw_figure
from megatron_jam.study.summary import LLM_PARENT, PARENT

LABELS = {LLM_PARENT: "text LLM parent", PARENT: "image-text parent (CM3leon-style)", "uniform": "JAM-Uniform",
          "width-copy": "JAM-Width (copy)", "width-average": "JAM-Width (average)", "cross-k1": "JAM-Cross k=1",
          "cross-k2": "JAM-Cross k=2",          "cross-k4": "JAM-Cross k=4", "instruct-only": "instruction data only",
          "instruct-mixed": "instruction + image-text data", "no-cross": "no cross blocks (not run here)"}
PRETRAIN = ("uniform", "width-copy", "width-average", "cross-k1", "cross-k2", "cross-k4")
INSTRUCT = ("instruct-only", "instruct-mixed")


def _load(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


class Cells:
    """Formats one model's mean (and spread over seeds) for the tables."""

    def __init__(self, summary: dict, paper: dict) -> None:
        self.models, self.paper = summary["models"], paper
        self.scales = summary["cfg_scales"]

    def metric(self, name: str, key: str, digits: int = 3) -> str:
        m = self.models.get(name)
        if m is None:
            return "not run"
        mean, std = m["mean"][key], m["std"][key]
        return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if std is not None else "")

    def accuracy(self, name: str) -> List[str]:
        m = self.models.get(name)
        out = []
        for s in self.scales:
            mean = (m["mean"]["accuracy"] or {}).get(s) if m else None
            std = (m["std"]["accuracy"] or {}).get(s) if m else None
            out.append(fmt(mean) + (f" ± {fmt(std)}" if std is not None else ""))
        return out

    def params(self, name: str) -> str:
        m = self.models.get(name)
        return fmt(int(m["mean"]["params"])) if m and m["mean"]["params"] is not None else "n/a"

    def ours(self, name: str) -> List[str]:
        """params, text PPL, image-text PPL, accuracy per scale, training seconds ("not run" if not trained)."""
        if name not in self.models:
            return ["not run"] * (4 + len(self.scales))
        return [self.params(name), self.metric(name, "text_ppl"), self.metric(name, "image_ppl"),
                *self.accuracy(name), self.metric(name, "train_seconds", 1)]

    def paper_cells(self, table: str, name: str, keys: List[str]) -> List[str]:
        row = self.paper[table]["rows"].get(name, {})
        return [str(row[k]) if k in row else "–" for k in keys]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _our_header(scales: List[str]) -> List[str]:
    return ["params", "text PPL", "image-text PPL", *(f"prompt acc. (cfg {s})" for s in scales), "train s"]


def paper_tables(c: Cells) -> List[str]:
    """Tables 2-5: our columns, then the paper's."""
    ours = _our_header(c.scales)
    lines = ["## Table 2: fusion methods", ""]
    lines += _table(["model", *ours, "paper size", "paper MS-COCO PPL"],
                    [[LABELS[n], *c.ours(n), *c.paper_cells("table2", n, ["size", "image_ppl"])]
                     for n in (LLM_PARENT, PARENT, "uniform", "width-copy", "cross-k2")])
    lines += ["## Table 3: JAM-Width initialisation", ""]
    lines += _table(["init", *ours, "paper Wikipedia PPL", "paper MS-COCO PPL"],
                    [[LABELS[n], *c.ours(n), *c.paper_cells("table3", n, ["text_ppl", "image_ppl"])]
                     for n in ("width-copy", "width-average")])
    lines += ["## Table 4: JAM-Cross, cross blocks every k layers", ""]
    rows = [[LABELS[n], *c.ours(n), *c.paper_cells("table4", n, ["size", "text_ppl", "image_ppl"])]
            for n in ("no-cross", "cross-k1", "cross-k2", "cross-k4")]
    lines += _table(["cross blocks", *ours, "paper size", "paper Wikipedia PPL", "paper MS-COCO PPL"], rows)
    lines += ["## Table 5: instruction tuning of JAM-Cross k=2, with and without image-text pretraining data", ""]
    lines += _table(["instruction-tuning data", *ours, "paper MS-COCO PPL"],
                    [[LABELS[n], *c.ours(n), *c.paper_cells("table5", n, ["image_ppl"])] for n in INSTRUCT])
    return lines


def findings(summary: dict) -> List[str]:
    rows, held = [], 0
    for f in summary["findings"]:
        verdict = {True: "**held**", False: "**did not hold**", None: "not measured"}[f["held"]]
        if f["held"] is not None and f["largest_std"] is not None and abs(f["difference"]) < f["largest_std"]:
            verdict += " (within the spread over seeds)"
        held += f["held"] is True
        rows.append([f["table"], f["claim"], verdict, fmt(f["difference"]), fmt(f["largest_std"]),
                     f"{f['seeds_held']} of {f['seeds']}"])
    head = [f"{held} of {len(rows)} of the paper's findings held at this scale (on the mean over seeds; "
            "lower PPL is better). Where one did not, that is what this run measured: the study was not tuned "
            "to agree. *difference*: the first model's PPL minus the best of the models it is compared with "
            "(negative: the finding holds); a difference smaller than the *largest std* (the spread over seeds "
            "of the models compared) is within noise.", ""]
    header = ["paper table", "finding", "here", "difference", "largest std", "seeds where it held"]
    return ["## Findings", "", *head, *_table(header, rows)]


def setup_lines(cfg: dict, machine: dict, summary: dict) -> List[str]:
    gpu = machine["gpu"] or "none"
    return [
        "## Run", "",
        f"- command: `{cfg['command']}`",
        f"- machine: {machine['cpu_count']} CPU cores ({machine['processor']}), GPU: {gpu}, torch {machine['torch']}, "
        f"Python {machine['python']}, {machine['platform']}",
        f"- started {machine['started']}, finished {machine['finished']}; wall time {machine['wall_minutes']} min "
        f"({machine['wall_seconds']} s{_resumed(machine)}), {cfg['jobs']} jobs at once, {cfg['nproc']} process(es) "
        "per training job",
        f"- seeds: {', '.join(map(str, cfg['seeds']))} (the first one also seeds the world, the VQ tokenizer and "
        "the parents; a ± value is the standard deviation over seeds)",
        f"- parents: {cfg['num_layers']} layers, hidden size {cfg['hidden_size']}, sequence length "
        f"{cfg['seq_length']}; LLM parent {cfg['llm_iters']} steps on text, image-text parent {cfg['img_iters']} "
        f"steps (CM3); VQ tokenizer {cfg['vq_iters']} steps",
        f"- every variant: {cfg['train_iters']} steps x {cfg['global_batch']} sequences x {cfg['seq_length']} tokens "
        "of an equal-weight text / image-text blend, from the same parents; instruction tuning of JAM-Cross k=2: "
        f"{cfg['instruct_iters']} steps on {cfg['instruct_docs']} how-to instructions (\"how to draw ...\" -> steps "
        "with pictures), alone or blended equally with image-text pretraining data, no CM3",
        f"- held-out sets: a second world ({cfg['heldout_docs']} text documents, {cfg['heldout_docs']} image-text "
        f"documents), first {cfg['eval_windows']} windows each (tools/evaluate.py); prompt following: "
        f"{summary['prompts']} prompts x {cfg['samples_per_prompt']} samples (tools/evaluate_generation.py, "
        f"chance {fmt(summary['chance_joint_accuracy'])})", ""]


def _resumed(machine: dict) -> str:
    n = machine.get("resumed") or 0
    return f"; stopped and resumed (--resume) {n} time(s), the wall time is the sum of the runs" if n else ""


def figures(out: str, summary: dict) -> List[str]:
    """loss_curves.png (first seed) and results.png (PPL and accuracy bars with the spread)."""
    seed = str(summary["seeds"][0])
    curve = lambda n: _curve(os.path.join(out, "variants", seed, n, "train", "metrics.jsonl"))  # noqa: E731
    curves = {n: curve(n) for n in PRETRAIN if n in summary["models"]}
    tuned = {n: curve(n) for n in INSTRUCT if n in summary["models"]}
    draw_figure(os.path.join(out, "loss_curves.png"),
                [("line", f"continued pretraining: training loss (seed {seed})", curves),
                 ("line", f"instruction tuning: training loss (seed {seed})", tuned)])
    models = summary["models"]
    names = [n for n in (LLM_PARENT, PARENT, *PRETRAIN, *INSTRUCT) if n in models]
    bars = lambda key: [(n, models[n]["mean"][key], models[n]["std"][key]) for n in names]  # noqa: E731
    scale = summary["cfg_scales"][-1]
    acc = [(n, (models[n]["mean"]["accuracy"] or {}).get(scale), (models[n]["std"]["accuracy"] or {}).get(scale))
           for n in names]
    draw_figure(os.path.join(out, "results.png"),
                [("bar", "text PPL on held-out text (lower is better)", bars("text_ppl")),
                 ("bar", "image-text PPL on held-out image-text (lower is better)", bars("image_ppl")),
                 ("bar", f"prompt-following joint accuracy, cfg {scale} (higher is better)", acc)])
    return ["## Plots", "", "![training loss of every variant](loss_curves.png)", "",
            "![held-out PPL and prompt following per model](results.png)", ""]


def _curve(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return [(r["iteration"], r["lm_loss"]) for r in recs if r.get("lm_loss") is not None and "valid_set" not in r]


NOTES = [
    "## How to read this", "",
    "- Scale: the paper merges two 7B models and trains on 25-50B tokens; here two tiny parents are merged and "
    "trained for a few hundred steps on a closed world of drawn shapes. Differences between variants are small "
    "and can be within the spread over seeds: the column \"seeds where it held\" says how robust each verdict is.",
    "- Text PPL plays the paper's Wikipedia column (held-out text-only documents), image-text PPL its MS-COCO "
    "column (held-out captions with pictures and how-to documents); PPL is over all tokens of each set.",
    "- Parameter counts are the models' own (megatron_jam/models/param_count.py on each checkpoint's "
    "model_config.json); at this size the shared embedding is a large share, so ratios differ from the paper's.",
    "- Prompt-following accuracy is the joint (colour and shape) accuracy of generated pictures read back by the "
    "world's exact attribute reader, over the few pictures named under Run: a difference of a few pictures is "
    "noise, and tiny models trained this briefly stay near chance (docs/generation.md measures the spread).",
    "- Training seconds are wall time of the trainer process while other jobs ran beside it (--jobs): "
    "comparable in order, not exact.",
    "- The paper's Table 4 row without cross blocks is not run: the converter builds JAM-Cross with k >= 1.", ""]


def write_report(out: str) -> str:
    """Write ``out/report.md`` (and its PNGs) from the run's JSON files; returns the path."""
    summary, machine, cfg = _load(out, "summary.json"), _load(out, "machine.json"), _load(out, "study_config.json")
    with open(os.path.join(out, "paper_tables.json"), "w") as f:
        json.dump(PAPER, f, indent=1)
    paper = _load(out, "paper_tables.json")
    lines = ["# JAM's ablations at small scale (picture world)", "",
             f"Paper numbers: {paper['source']}; {paper['parents']}.", ""]
    lines += setup_lines(cfg, machine, summary) + findings(summary) + [""]
    lines += paper_tables(Cells(summary, paper)) + figures(out, summary) + NOTES
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def publish(out: str, target: str) -> str:
    """Copy ``out/report.md`` to `target` (e.g. docs/study.md) and its PNGs next to it in ``<target stem>/``."""
    folder = os.path.splitext(target)[0]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    for png in ("loss_curves.png", "results.png"):
        shutil.copyfile(os.path.join(out, png), os.path.join(folder, png))
        text = text.replace(f"]({png})", f"]({os.path.basename(folder)}/{png})")
    note = (f"(A copy of `{os.path.join(out, 'report.md')}`, written by the study itself; rerun it with the command "
            "below, or rewrite it from a finished run with `python -m megatron_jam.study.report RUN_DIR --publish "
            f"{target}`.)\n\n")
    title, _, rest = text.partition("\n\n")
    with open(target, "w") as f:
        f.write(title + "\n\n" + note + rest)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from megatron_jam.study.summary import write_summary
    from megatron_jam.utils.logging import get_logger

    p = argparse.ArgumentParser(prog="python -m megatron_jam.study.report",
                                description="rewrite summary.json and report.md of a finished study run")
    p.add_argument("run_dir")
    p.add_argument("--publish", help="also copy the report and its plots here (e.g. docs/study.md)")
    args = p.parse_args(argv)
    write_summary(args.run_dir)
    path = write_report(args.run_dir)
    if args.publish:
        path = publish(args.run_dir, args.publish)
    get_logger("megatron_jam.study").info("%s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
