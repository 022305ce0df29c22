"""What a new user meets first (issue 16): quiet and fast start-up, one-line errors, Megatron-style trainer
start-up (arguments block, args.json, model-shape flags, --train-samples, --exit-interval), progress that
suits where it goes, and a loss plot that names its validation sets.

Cheap on purpose: bad inputs run in-process and fail before anything heavy; one tiny training run in a
subprocess covers the quiet start-up, args.json, the shape flags, --train-samples and --exit-interval.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tool_loader import load_tool

from megatron_jam import platform
from megatron_jam.utils.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT_CONFIG = os.path.join(REPO, "examples", "configs", "parent_llm_tiny.json")
NOWHERE = "/nonexistent/jam"


# ------------------------------------------------------------------ one-line errors
def _pretrain(argv):
    from megatron_jam.pretrain import cli

    return cli(argv)


def _plot(argv):
    from megatron_jam.training import plot

    return run_cli(plot._cli, argv, extra_errors=(ValueError,))


def _tool(name):
    return lambda argv: load_tool(name).main(argv)


def _bad_inputs(tmp):
    """(command, argv, what the line must say): a bad path or a bad combination of flags per command."""
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    return [
        ("build_retrieval_index", ["--data-path", NOWHERE, "--clip-model", empty, "--output", f"{tmp}/i"], ".idx"),
        ("retrieve", ["--data-path", NOWHERE, "--index", f"{tmp}/i"], ".idx"),
        ("convert_checkpoint", ["--method", "cross", "--llm", NOWHERE, "--img", empty, "--save", f"{tmp}/c"],
         "--llm"),
        ("convert_checkpoint", ["--method", "export", "--llm", empty, "--save", f"{tmp}/c"], "takes --load"),
        ("convert_image_tokenizer", ["--load", NOWHERE, "--config", NOWHERE, "--save", f"{tmp}/v"], "--config"),
        ("evaluate", ["--load", NOWHERE, "--data-path", NOWHERE], "--load"),
        ("evaluate_generation", ["--load", NOWHERE, "--prompts-file", NOWHERE, "--output", f"{tmp}/e.json"],
         "--load"),
        ("generate_interleaved", ["--load", empty, "--prompt", "a", "--output", f"{tmp}/g", "--retrieval-k", "2"],
         "--retrieval-index"),
        ("inspect_dataset", [NOWHERE], "vocabulary layout"),
        ("preprocess_instruct", ["--input", NOWHERE, "--output-prefix", f"{tmp}/p", "--tokenizer-model", NOWHERE],
         "--input"),
        ("preprocess_interleaved", ["--input", NOWHERE, "--output-prefix", f"{tmp}/p", "--tokenizer-model",
                                    NOWHERE], "--input"),
        ("train_image_tokenizer", ["--input", empty, "--save", f"{tmp}/t"], "no image files"),
        ("pretrain", ["--model-config", NOWHERE], "--model-config"),
        ("pretrain", ["--train-iters", "3", "--train-samples", "5"], "exclude each other"),
        ("pretrain", ["--valid-data-path", "text=x"], "needs --data-path"),
        ("plot", [NOWHERE], "metrics.jsonl"),
    ]


COMMANDS = {"pretrain": _pretrain, "plot": _plot}
BAD = [pytest.param(i, id=f"{name}-{i}") for i, (name, _, _) in enumerate(_bad_inputs("/tmp/jam-ids"))]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    name, argv, says = _bad_inputs(str(tmp_path))[case]
    command = COMMANDS.get(name) or _tool(name)
    assert command(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and says in err, err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    from megatron_jam.models.config import ConfigError

    with pytest.raises(ConfigError):
        _pretrain(["--model-config", NOWHERE, "--debug"])
    monkeypatch.setenv("MEGATRON_JAM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        _tool("inspect_dataset")([NOWHERE])


def test_a_bug_keeps_its_traceback():
    def broken(argv):
        raise KeyError("a bug, not a bad input")

    with pytest.raises(KeyError):
        run_cli(broken, [])


# ------------------------------------------------------------------ fast start-up
# Every command's --help in one fresh interpreter: none may import torch or Megatron-Core to parse flags.
HELP_PROBE = r"""
import glob, io, os, runpy, sys, contextlib
repo = sys.argv[1]
sys.path[:0] = [repo, os.path.join(repo, "tools")]
targets = [("module", "megatron_jam.pretrain"), ("module", "megatron_jam.training.plot")]
targets += [("path", p) for p in sorted(glob.glob(os.path.join(repo, "tools", "*.py")))]
for kind, target in targets:
    sys.argv = [target, "--help"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__")
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit:
            pass
    heavy = [m for m in ("torch", "megatron.core") if m in sys.modules]
    print("HELP", os.path.basename(target), "usage:" in out.getvalue(), ",".join(heavy) or "-")
"""


def test_help_of_every_command_imports_neither_torch_nor_megatron_core():
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, REPO], check=False, capture_output=True, text=True,
                         timeout=120)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("HELP")]
    assert len(rows) >= 13, out.stderr[-2000:]
    assert all(r[2] == "True" for r in rows), rows
    assert [r for r in rows if r[3] != "-"] == [], "imported to print --help"


DATA_TOOLS_PROBE = """
import sys
sys.path.insert(0, sys.argv[3])
import inspect_dataset, preprocess_interleaved
rc = preprocess_interleaved.main(["--input", sys.argv[1], "--output-prefix", sys.argv[2], "--tokenizer-model",
                                  sys.argv[4], "--codebook-size", "64", "--tokens-per-image", "16"])
rc += inspect_dataset.main([sys.argv[2], "--document", "1"])
print("RESULT", rc, "torch" in sys.modules, "megatron.core" in sys.modules)
"""


def _spm_model(folder) -> str:
    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "lambda"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 10)) for _ in range(60)]
    (folder / "c.txt").write_text("\n".join(lines))
    (folder / "d.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    spm.SentencePieceTrainer.train(input=str(folder / "c.txt"), model_prefix=str(folder / "m"), vocab_size=40,
                                   model_type="bpe", bos_id=-1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return str(folder / "m.model")


def test_text_preprocessing_and_inspection_import_neither_torch_nor_megatron_core(tmp_path):
    model = _spm_model(tmp_path)
    out = subprocess.run([sys.executable, "-c", DATA_TOOLS_PROBE, str(tmp_path / "d.jsonl"), str(tmp_path / "t"),
                          os.path.join(REPO, "tools"), model], check=False, capture_output=True, text=True, timeout=120)
    assert "RESULT 0 False False" in out.stdout, out.stdout[-1000:] + out.stderr[-2000:]


def test_inspection_reads_the_index_as_megatron_core_does(tmp_path):
    from jam_data_helpers import image_text_corpus, write_dataset

    prefix = write_dataset(tmp_path / "d", image_text_corpus(np.random.default_rng(0), 5))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.integrity import index_arrays

    ds, ours = IndexedDataset(prefix, multimodal=True), index_arrays(prefix)
    assert np.array_equal(ours["lengths"], ds.index.sequence_lengths)
    assert np.array_equal(ours["pointers"], ds.index.sequence_pointers)
    assert np.array_equal(ours["documents"], ds.index.document_indices)
    assert np.array_equal(ours["modes"], ds.index.sequence_modes)
    from megatron_jam.data.documents import split_segments
    from megatron_jam.data.vocab import load_layout

    layout = load_layout(prefix)
    first, last = ds.index.document_indices[2], ds.index.document_indices[3]
    seqs = [ds[int(i)] for i in range(first, last)]
    expected = split_segments(np.concatenate([t for t, _ in seqs]), [int(m) for _, m in seqs],
                              [len(t) for t, _ in seqs], layout)
    got = load_tool("inspect_dataset").document_segments(prefix, 2, layout)
    def plain(segments):
        return [tuple(np.asarray(x).tolist() for x in seg) for seg in segments]
    assert plain(got) == plain(expected) and len(got) > 1


# ------------------------------------------------------------------ trainer start-up
def _args(argv):
    from megatron_jam.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(argv)
    return args, validate_args(args)


def test_shape_flags_override_a_single_stack_config():
    _, cfg = _args(["--model-config", PARENT_CONFIG, "--num-layers", "2", "--hidden-size", "32",
                    "--num-attention-heads", "8", "--num-query-groups", "4", "--ffn-hidden-size", "96",
                    "--max-position-embeddings", "64", "--seq-length", "64"])
    p = cfg.parent
    assert (p.num_layers, p.hidden_size, p.num_attention_heads, p.num_query_groups, p.ffn_hidden_size,
            p.max_position_embeddings) == (2, 32, 8, 4, 96, 64)
    assert p.family == "llama" and p.rotary_base == 10000  # the rest of the config is kept


@pytest.mark.parametrize("argv, says", [
    (["--num-layers", "2"], "two parents"),  # the default model is the tiny JAM-Cross
    (["--model-config", PARENT_CONFIG, "--hidden-size", "32", "--load", REPO], "--load"),
    (["--model-config", PARENT_CONFIG, "--hidden-size", "30"], "--hidden-size"),
])
def test_shape_flags_are_refused_where_they_cannot_apply(argv, says):
    from megatron_jam.models.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        _args(argv)


@pytest.mark.parametrize("samples, iters", [(7, 4), (8, 4), (1, 1)])
def test_train_samples_give_megatron_iterations(samples, iters):
    args, _ = _args(["--train-samples", str(samples), "--micro-batch-size", "2"])
    assert args.train_iters == iters and args.global_batch_size == 2


def test_help_shows_defaults_and_a_description_for_every_method():
    from megatron_jam.training.arguments import build_parser

    text = build_parser().format_help()
    for expected in ("JAM-Cross, JAM-Width, JAM-Uniform or a single parent", "--lr LR", "(default: 0.0003)",
                     "(default: cosine)", "--train-samples", "--exit-interval", "--num-query-groups", "--debug"):
        assert expected in " ".join(text.split()), expected


def test_arguments_block_is_megatrons():
    from megatron_jam.training.arguments import format_args

    args, _ = _args(["--train-iters", "3"])
    lines = format_args(args).splitlines()
    assert lines[0] == "------------------------ arguments ------------------------"
    assert lines[-1] == "-------------------- end of arguments ---------------------"
    assert lines[1:-1] == sorted(lines[1:-1], key=str.lower)
    assert "  train_iters " + "." * (48 - len("train_iters")) + " 3" in lines


KNOWN = ("Falling back to", "Apex is not installed", "DTensor instead", "script_method", "full scope is deprecated",
         "warnings.warn")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny single-stack run from scratch: shape flags, --train-samples 7 (4 iterations of 2),
    --exit-interval 3, a checkpoint every iteration and validation (to meet the save-time warnings)."""
    save = tmp_path_factory.mktemp("run") / "run"
    argv = ["--model-config", PARENT_CONFIG, "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32",
            "--micro-batch-size", "2", "--train-samples", "7", "--exit-interval", "3", "--save", str(save),
            "--save-interval", "1", "--eval-interval", "2", "--eval-iters", "1"]
    env = dict(os.environ, MEGATRON_JAM_LOG_LEVEL="INFO")  # conftest quiets the logs of in-process tests
    out = subprocess.run([sys.executable, "-m", "megatron_jam.pretrain", *argv], check=False, capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return save, out.stderr


def test_start_up_is_quiet_and_says_which_kernels_run(tiny_run):
    _, err = tiny_run
    assert [k for k in KNOWN if k in err] == [], err[:3000]
    summary = platform.BACKENDS_LINE % "Transformer Engine and Apex"
    assert err.count(summary) == 1, err[:3000]
    assert err.count("------------------------ arguments ------------------------") == 1
    assert "\r" not in err


def test_resuming_is_quiet_too(tiny_run):
    save, _ = tiny_run
    argv = ["--load", str(save), "--train-iters", "4", "--micro-batch-size", "2", "--seq-length", "32"]
    out = subprocess.run([sys.executable, "-m", "megatron_jam.pretrain", *argv], check=False, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]  # resumed from iteration 3, checkpoint loaded
    assert [k for k in KNOWN + ("is deprecated",) if k in out.stderr] == [], out.stderr[:3000]


def test_args_json_holds_the_effective_arguments(tiny_run):
    save, _ = tiny_run
    with open(save / "args.json") as f:
        args = json.load(f)
    assert args["train_samples"] == 7 and args["train_iters"] == 4 and args["global_batch_size"] == 2
    assert args["num_layers"] == 2 and args["exit_interval"] == 3 and args["save"] == str(save)
    with open(save / "model_config.json") as f:
        recorded = json.load(f)
    assert (recorded["parent"]["num_layers"], recorded["parent"]["hidden_size"]) == (2, 32)
    assert recorded["seq_length"] == 32, "the checkpoint records the length it trained at, not the config's"


def test_exit_interval_stops_with_a_checkpoint(tiny_run):
    save, err = tiny_run
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (save / "iter_0000004").exists()
    with open(save / "metrics.jsonl") as f:
        iterations = [r["iteration"] for r in map(json.loads, f) if "lm_loss" in r]
    assert iterations == [1, 2, 3] and "--exit-interval 3: exiting at iteration 3" in err


# ------------------------------------------------------------------ progress and the plot
PROGRESS = ("from megatron_jam.utils.progress import progress\n"
            "bar = progress(total=40, desc='docs', unit='doc')\n"
            "for _ in range(40): bar.update(1)\n"
            "bar.close()\n")


def test_progress_is_log_lines_off_a_terminal_and_a_bar_on_one():
    env = dict(os.environ, MEGATRON_JAM_LOG_LEVEL="INFO")
    out = subprocess.run([sys.executable, "-c", PROGRESS], check=False, capture_output=True, text=True, timeout=60,
                         env=env)
    assert "\r" not in out.stderr and "docs: 40/40 (100%) doc" in out.stderr, out.stderr
    assert 2 <= out.stderr.count("docs:") <= 11
    import pty

    leader, follower = pty.openpty()
    subprocess.run([sys.executable, "-c", PROGRESS], check=False, stderr=follower, timeout=60, env=env)
    os.close(follower)
    assert b"\r" in os.read(leader, 65536)  # tqdm redraws in place on a terminal
    os.close(leader)


def test_plot_names_every_validation_set(tmp_path):
    from megatron_jam.training import plot

    rows = [{"iteration": 1, "lm_loss": 5.0, "text_loss": 5.1, "image_loss": 4.9},
            {"iteration": 2, "lm_loss": 4.0, "text_loss": 4.1, "image_loss": 3.9},
            {"iteration": 2, "valid_set": "text", "valid_lm_loss": 4.2},
            {"iteration": 2, "valid_set": "image", "valid_lm_loss": 4.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
    labels = [label for _, _, label in plot.legend(series)]
    assert labels[-2:] == ["validation text", "validation image"]
    assert len({color for _, color, _ in plot.legend(series)}) == len(labels)
    assert plot.main([str(tmp_path)]) == str(tmp_path / "loss.png") and (tmp_path / "loss.png").exists()
