"""The ablation study (megatron_jam/study): a real partial run through every tool, and its report.

The whole ``--quick`` study takes about 5 minutes on 2 cores, too long for the suite,
so the test runs its smallest meaningful part: the same pipeline (world, VQ
tokenizer, shards, both parents, a conversion, continued pretraining, instruction
tuning with image-text data, tools/evaluate.py, tools/evaluate_generation.py) for
JAM-Cross k=2 and one instruction-tuning variant, with very few steps. It checks the
report's structure (all four paper tables, a row for every model, "not run" where a
model was left out, findings, plots) and that every number in ``report.md``
appears in the run's own JSON files, and that ``summary.json`` holds exactly what
the tools wrote.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from megatron_jam.study.report import LABELS
from megatron_jam.study.summary import CLAIMS, _aggregate, check_claims

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"\d+(?:\.\d+)?")
SMALL = ["--quick", "--variants", "cross-k2", "instruct-mixed", "--seeds", "7", "--vq-iters", "30",
         "--llm-iters", "10", "--img-iters", "16", "--train-iters", "6", "--instruct-iters", "4",
         "--eval-windows", "4", "--text-docs", "200", "--image-text-docs", "200", "--interleaved-docs", "40",
         "--heldout-docs", "40", "--instruct-docs", "40", "--cfg-scales", "1", "3.5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study") / "run")
    env = dict(os.environ, MEGATRON_JAM_LOG_LEVEL="INFO")
    proc = subprocess.run([sys.executable, "-m", "megatron_jam.study", *SMALL, "--output", out], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _json_files(run: str):
    for root, _, files in os.walk(run):
        for name in files:
            if name.endswith((".json", ".jsonl")):
                yield os.path.join(root, name)


def _numbers_of_run(run: str):
    """(every digit run in the run's JSON text, every float value in it)."""
    tokens, floats = set(), set()

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            floats.add(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in _json_files(run):
        with open(path) as f:
            text = f.read()
        tokens.update(NUMBER.findall(text))
        for line in text.splitlines() if path.endswith(".jsonl") else [text]:
            if line.strip():
                walk(json.loads(line))
    return tokens, floats


def test_report_structure(run_dir):
    with open(os.path.join(run_dir, "report.md")) as f:
        report = f.read()
    for heading in ("## Run", "## Findings", "## Table 2", "## Table 3", "## Table 4", "## Table 5", "## Plots"):
        assert heading in report, heading
    for name, label in LABELS.items():
        rows = [line for line in report.splitlines() if line.startswith(f"| {label} |")]
        assert rows, f"no row for {label}"
        if name in ("cross-k2", "instruct-mixed", "img-parent"):
            assert all("not run" not in r and "n/a" not in r for r in rows), rows
        elif name == "llm-parent":  # text only: no image-text PPL, no pictures
            assert all("not run" not in r and r.count("n/a") == 1 + 2 for r in rows), rows
        else:
            assert all("not run" in r for r in rows), rows
    for claim in CLAIMS:
        assert claim.text in report
    for png in ("loss_curves.png", "results.png"):
        with open(os.path.join(run_dir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    assert "prompt acc. (cfg 1.0)" in report and "prompt acc. (cfg 3.5)" in report


def test_every_number_in_the_report_comes_from_the_run(run_dir):
    with open(os.path.join(run_dir, "report.md")) as f:
        report = f.read()
    tokens, floats = _numbers_of_run(run_dir)
    missing = []
    for tok in NUMBER.findall(report):
        if tok in tokens:
            continue
        digits = len(tok.split(".")[1]) if "." in tok else 0
        if not any(f"{abs(v):.{digits}f}" == tok for v in floats):  # the sign is not part of the token
            missing.append(tok)
    assert not missing, f"numbers in report.md found in no JSON file of the run: {missing}"


def test_summary_holds_what_the_tools_wrote(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    for name in ("cross-k2", "instruct-mixed"):
        folder = os.path.join(run_dir, "variants", "7", name, "train")
        row = summary["models"][name]["seeds"]["7"]
        with open(os.path.join(folder, "eval_text.json")) as f:
            assert row["text_ppl"] == json.load(f)["ppl"]["all"]
        with open(os.path.join(folder, "eval_image.json")) as f:
            assert row["image_ppl"] == json.load(f)["ppl"]["all"]
        with open(os.path.join(folder, "prompt_following.json")) as f:
            results = json.load(f)["results"]
        assert row["accuracy"] == {s: r["joint_accuracy"] for s, r in results.items()}
        assert row["params"] > 0 and row["train_seconds"] > 0
    with open(os.path.join(run_dir, "timings.json")) as f:
        assert summary["models"]["cross-k2"]["seeds"]["7"]["train_seconds"] == json.load(f)["7/cross-k2/train"]


def test_spread_and_claims_over_seeds():
    rows = {"1": {"text_ppl": 2.0, "image_ppl": 4.0, "accuracy": {"3.5": 0.5}},
            "2": {"text_ppl": 4.0, "image_ppl": 6.0, "accuracy": {"3.5": 1.0}}}
    mean, std = _aggregate(rows)
    assert mean["text_ppl"] == 3.0 and std["text_ppl"] == pytest.approx(2 ** 0.5)
    assert mean["accuracy"] == {"3.5": 0.75} and mean["params"] is None and std["params"] is None
    worse = {"1": {"image_ppl": 5.0}, "2": {"image_ppl": 5.0}}
    models = {"instruct-mixed": {"seeds": rows, "mean": mean, "std": std},
              "instruct-only": {"seeds": worse, "mean": {"image_ppl": 5.0}, "std": {"image_ppl": 0.0}}}
    table5 = [f for f in check_claims(models, [1, 2]) if f["table"] == "5"][0]
    assert table5["held"] is False and table5["seeds_held"] == 1 and table5["seeds"] == 2
    assert table5["difference"] == 0.0 and table5["largest_std"] == pytest.approx(2 ** 0.5)
    assert all(f["held"] is None for f in check_claims(models, [1, 2]) if f["table"] == "3")


def test_runner_resume_skips_only_steps_that_succeeded(tmp_path):
    from megatron_jam.study.jobs import Runner, StudyError

    touch = lambda name: [sys.executable, "-c", f"open({str(tmp_path / name)!r}, 'w').close()"]  # noqa: E731
    first = Runner(REPO, str(tmp_path / "run"))
    first.run("ok", touch("a"))
    with pytest.raises(StudyError, match="step bad failed .*bad.log"):
        first.run("bad", [sys.executable, "-c", "raise SystemExit(3)"])
    os.remove(tmp_path / "a")
    again = Runner(REPO, str(tmp_path / "run"), resume=True)
    again.run("ok", touch("a"))  # succeeded before: not run again
    again.run("bad", touch("b"))  # failed before: run
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
    with open(tmp_path / "run" / "timings.json") as f:
        assert set(json.load(f)) == {"ok", "bad"}
