"""Adversarial data probes (issue 14, part B; docs/reliability.md, section "Data").

Each test plays a hostile or unlucky user against preprocessing, training data and evaluation
and asserts three things: the exit code, the one-line message (naming the file), and that nothing
good was lost and nothing bad was left looking valid. Tiny inputs only: a sentencepiece model
trained on a few hundred words, image documents as `image_tokens` (no VQ model), synthetic
shards written through the C++ builder (tests/jam_data_helpers.py). Runs that could hang (worker
pools) or that must be killed run in a subprocess with a timeout.
"""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jam_data_helpers import LAYOUT, text_only_corpus, write_dataset
from tool_loader import TOOLS, load_tool

REPO = os.path.abspath(os.path.join(TOOLS, ".."))
WORDS = "ka lo mi ter san bu ra ne zo pi qua fel dor im ux gra spe thi wo vy".split()
SURROGATE = '{"id": "odd", "content": [{"text": "a lone \\ud800 surrogate"}]}'
HANG = int(os.environ.get("PROBE_HANG", 90))  # seconds: a run that takes longer has hung (each takes a few)

# A preprocessing run in a child process, with an optional fault injected before main():
# "boom": an unexpected exception while encoding the document whose id is "boom";
# "die": the worker process encoding that document exits at once (killed, out of memory);
# "kill": SIGKILL of the whole tool after the 4th shard is complete (a killed job).
PROBE_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tools!r})
import preprocess_interleaved as p
fault = os.environ.get("PROBE_FAULT")
if fault in ("boom", "die"):
    real = p.content_items
    def content_items(record, keys):
        if isinstance(record, dict) and record.get("id") == "boom":
            if fault == "die":
                os._exit(3)  # the worker process vanishes (as when the OOM killer takes it)
            raise RuntimeError("injected failure")
        return real(record, keys)
    p.content_items = content_items
elif fault == "kill":
    real_close = p.ShardWriter._close
    def _close(self):
        real_close(self)
        if len(self.shards) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    p.ShardWriter._close = _close
sys.exit(p.main(sys.argv[1:]))
"""


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)]), model_writer=model,
        vocab_size=64, model_type="unigram", hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="identity")
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(model.getvalue())
    return str(path)


def good_lines(n, seed=0):
    """n good documents: text, and text + image codes (16 codes of a 16-entry codebook)."""
    rng = random.Random(seed)
    lines = []
    for d in range(n):
        content = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))}]
        if d % 2:
            content.append({"image_tokens": [rng.randrange(16) for _ in range(16)]})
        lines.append(json.dumps({"id": f"doc-{d}", "content": content}))
    return lines


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tool_argv(spm_model, inputs, prefix, *extra):
    return ["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer-model", spm_model,
            "--codebook-size", "16", "--tokens-per-image", "16", "--no-progress-bar", *extra]


def run_inprocess(tool, argv, capsys):
    """(exit code, stderr lines) of `tools/<tool>.py` run in this process."""
    rc = load_tool(tool).main(argv)
    return rc, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def run_child(argv, tmp_path, fault=None, timeout=HANG):
    """(exit code, stderr lines) of tools/preprocess_interleaved.py in a child process."""
    script = tmp_path / "probe_tool.py"
    script.write_text(PROBE_SCRIPT.format(tools=TOOLS))
    env = {**os.environ, "PROBE_FAULT": fault or "", "MEGATRON_JAM_LOG_LEVEL": "WARNING"}
    try:
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the tool hung (no exit within {timeout} s)")
    return proc.returncode, [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x
                             and not x.startswith("  warnings.warn")]


def stored_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), multimodal=True)
    return len(ds.document_indices) - 1


def snapshot(folder):
    """{file name: bytes} of everything in `folder` (hidden staging folders included)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def one_error_line(lines, *needles):
    """The run's stderr is one `error: ...` line holding every needle."""
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not any("Traceback" in x for x in lines), lines
    return errors[0]


# ---------------------------------------------------------------- 2. one odd line
@pytest.mark.parametrize("workers", [1, 2])
def test_a_lone_surrogate_is_a_reject_and_every_good_document_is_kept(spm_model, tmp_path, capsys, workers):
    lines = good_lines(20)
    lines.insert(6, SURROGATE)  # line 7
    lines.insert(12, '{"text": "\\udfff"}')  # line 13, a text-only record
    lines.insert(16, "[" * 100000 + "]" * 100000)  # line 17: nesting deeper than the JSON parser's recursion
    src = write_jsonl(tmp_path / "docs.jsonl", lines)
    argv = tool_argv(spm_model, [src], tmp_path / "out", "--max-reject-fraction", "0.5", "--workers", str(workers),
                     "--chunk-size", "1")  # more chunks than may be in flight: a lost error used to hang the pool
    rc, err = run_child(argv, tmp_path) if workers > 1 else run_inprocess("preprocess_interleaved", argv, capsys)
    assert rc == 0, err
    rejects = [json.loads(x) for x in open(tmp_path / "out.rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(7, "untokenizable_text"), (13, "untokenizable_text"),
                                                           (17, "malformed_json")]
    assert all(r["file"] == src and r["detail"] for r in rejects)
    stats = json.load(open(tmp_path / "out.stats.json"))
    assert stats["documents"] == 20 and stats["skipped"] == 3
    assert stored_documents(tmp_path / "out") == 20


@pytest.mark.parametrize("workers,fault", [(1, "boom"), (2, "boom"), (2, "die")])
def test_an_error_inside_a_worker_fails_the_run_naming_file_and_line(spm_model, tmp_path, capsys, workers, fault):
    lines = good_lines(30)
    lines[17] = json.dumps({"id": "boom", "content": [{"text": "ka lo"}]})  # line 18
    src = write_jsonl(tmp_path / "docs.jsonl", lines)
    argv = tool_argv(spm_model, [src], tmp_path / "out", "--workers", str(workers), "--chunk-size", "1")
    if workers > 1:
        rc, err = run_child(argv, tmp_path, fault=fault)
    else:  # in this process: the same fault, injected into a fresh copy of the tool
        tool = load_tool("preprocess_interleaved")
        real = tool.content_items

        def content_items(record, keys):
            if isinstance(record, dict) and record.get("id") == "boom":
                raise RuntimeError("injected failure")
            return real(record, keys)
        tool.content_items = content_items
        rc, err = tool.main(argv), capsys.readouterr().err.splitlines()
    assert rc == 2, err
    if fault == "die":  # every chunk in flight failed with it: their lines are named, 18 among them
        line = one_error_line(err, src, "a worker process died")
        first, last = map(int, re.search(r"lines (\d+)-(\d+)", line).groups())
        assert first <= 18 <= last
    else:
        one_error_line(err, f"{src} line 18", "RuntimeError: injected failure")
    left = sorted(set(os.listdir(tmp_path)) - {"probe_tool.py"})
    assert left == ["docs.jsonl"]  # no data, stats, layout or staging folder left


def test_instruct_a_lone_surrogate_is_a_reject(spm_model, tmp_path, capsys):
    lines = [json.dumps({"prompt": "ka lo mi", "response": "ter san bu"})] * 9
    lines.insert(4, '{"prompt": "ka \\ud800", "response": "lo"}')
    src = write_jsonl(tmp_path / "instr.jsonl", lines)
    argv = tool_argv(spm_model, [src], tmp_path / "ins", "--max-reject-fraction", "0.5")
    argv.remove("--no-progress-bar")
    rc, err = run_inprocess("preprocess_instruct", argv, capsys)
    assert rc == 0, err
    rejects = [json.loads(x) for x in open(tmp_path / "ins.rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(5, "untokenizable_text")]
    assert stored_documents(tmp_path / "ins") == 9


# ---------------------------------------------------------------- 3. re-runs into an existing prefix
def test_an_existing_output_prefix_is_refused_without_overwrite(spm_model, tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", good_lines(12))
    out = tmp_path / "out"
    out.mkdir()
    assert run_inprocess("preprocess_interleaved", tool_argv(spm_model, [src], out / "d"), capsys)[0] == 0
    before = snapshot(out)
    rc, err = run_inprocess("preprocess_interleaved", tool_argv(spm_model, [src], out / "d", "--num-sentinels", "4"),
                            capsys)
    assert rc == 2
    one_error_line(err, f"--output-prefix {out / 'd'}", "--overwrite")
    assert snapshot(out) == before
    instruct = write_jsonl(tmp_path / "i.jsonl", [json.dumps({"prompt": "ka", "response": "lo mi"})] * 3)
    argv = tool_argv(spm_model, [instruct], out / "d")
    argv.remove("--no-progress-bar")
    rc, err = run_inprocess("preprocess_instruct", argv, capsys)
    assert rc == 2
    one_error_line(err, f"--output-prefix {out / 'd'}", "--overwrite")
    assert snapshot(out) == before
    rc, err = run_inprocess("preprocess_instruct", argv + ["--overwrite"], capsys)  # replaces the whole set
    assert rc == 0, err
    assert stored_documents(out / "d") == 3
    assert sorted(snapshot(out)) == sorted(["d.bin", "d.idx", "d.vocab.json", "d.stats.json", "d.rejects.jsonl",
                                            "d.loss_mask.npy"])


def test_a_failed_overwrite_leaves_the_old_set_intact(spm_model, tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", good_lines(12))
    out = tmp_path / "out"
    out.mkdir()
    assert run_inprocess("preprocess_interleaved", tool_argv(spm_model, [src], out / "d"), capsys)[0] == 0
    before = snapshot(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", good_lines(8)[:5] + [json.dumps({"id": "boom", "content": []})])
    rc, err = run_child(tool_argv(spm_model, [bad], out / "d", "--overwrite", "--num-sentinels", "4"), tmp_path,
                        fault="boom")
    assert rc == 2, err
    one_error_line(err, f"{bad} line 6", "injected failure")
    assert snapshot(out) == before  # old .bin/.idx, old layout, old stats; no staging folder left


def test_a_killed_sharded_overwrite_leaves_the_old_shards_and_a_rerun_replaces_them(spm_model, tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", good_lines(30))
    out = tmp_path / "out"
    out.mkdir()
    argv = tool_argv(spm_model, [src], out / "d", "--shard-size", "2")
    assert run_inprocess("preprocess_interleaved", argv, capsys)[0] == 0
    before = snapshot(out)
    assert sorted(n for n in before if n.endswith(".idx")) == [f"d_{i:05d}.idx" for i in range(15)]
    new = write_jsonl(tmp_path / "new.jsonl", good_lines(30, seed=1))
    rerun = tool_argv(spm_model, [new], out / "d", "--shard-size", "2", "--num-sentinels", "4", "--overwrite")
    rc, _ = run_child(rerun, tmp_path, fault="kill")
    assert rc == -signal.SIGKILL
    visible = {k: v for k, v in snapshot(out).items() if not k.startswith(".")}
    assert visible == before  # old shards 0-14 and old stats, none of the new shards
    rerun[rerun.index("2")] = "8"  # 4 shards this time
    assert run_inprocess("preprocess_interleaved", rerun, capsys)[0] == 0
    after = snapshot(out)  # the killed run's staging folder is gone, old shards 4-14 too
    assert sorted(n for n in after if n.endswith(".idx")) == [f"d_{i:05d}.idx" for i in range(4)]
    assert sorted(after) == sorted([f"d_{i:05d}.{e}" for i in range(4) for e in ("bin", "idx")] +
                                   ["d.vocab.json", "d.stats.json", "d.rejects.jsonl"])
    stats = json.load(open(out / "d.stats.json"))
    assert stats["outputs"] == [str(out / f"d_{i:05d}") for i in range(4)] and stats["documents"] == 30
    assert json.load(open(out / "d.vocab.json"))["num_sentinels"] == 4


# ---------------------------------------------------------------- 4. data that does not match the model
def _train_args(prefix, tmp_path, *flags):
    from megatron_jam.training.arguments import build_parser

    return build_parser().parse_args(["--data-path", prefix, "--no-cm3", "--train-iters", "2", "--seq-length", "16",
                                      "--micro-batch-size", "2", "--global-batch-size", "2",
                                      "--data-cache-path", str(tmp_path / "cache"), *flags])


def _checkpoint(folder, layout=LAYOUT):
    """A folder with what the data checks read of a checkpoint: model_config.json, vocab_layout.json."""
    import shutil

    from megatron_jam.training.arguments import TINY_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_CONFIG, folder / "model_config.json")
    layout.to_json(folder / "vocab_layout.json")
    return str(folder)


OTHER_LAYOUTS = {
    "other_sentinel_count": (dict(num_sentinels=4), "num_sentinels: 4"),
    "other_tokenizer": (dict(text_tokenizer="sentencepiece:sha256:0123456789abcdef"), "text_tokenizer"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_LAYOUTS))
def test_shards_of_another_layout_are_refused_by_training_and_evaluation(tmp_path, capsys, kind):
    import dataclasses

    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.data import build_data_sources

    change, message = OTHER_LAYOUTS[kind]
    ours = dataclasses.replace(LAYOUT, text_tokenizer="sentencepiece:sha256:fedcba9876543210")
    ckpt = _checkpoint(tmp_path / "ckpt", ours)
    layout = dataclasses.replace(ours, **change)
    prefix = write_dataset(tmp_path / "other", text_only_corpus(np.random.default_rng(0), 100, layout), layout)
    args = _train_args(prefix, tmp_path, "--load", ckpt)
    with pytest.raises(ConfigError) as error:
        build_data_sources(args, SimpleNamespace(vocab_size=512), checkpoint_dir=ckpt)
    assert all(n in str(error.value) for n in (f"{prefix}.vocab.json", message, f"{ckpt}/vocab_layout.json"))
    good = write_dataset(tmp_path / "good", text_only_corpus(np.random.default_rng(0), 100), ours)
    args = _train_args(good, tmp_path, "--load", ckpt, "--eval-interval", "1", "--valid-data-path", f"v={prefix}")
    with pytest.raises(ConfigError, match=message):  # a named validation set is checked too
        build_data_sources(args, SimpleNamespace(vocab_size=512), checkpoint_dir=ckpt)
    rc, err = run_inprocess("evaluate", ["--load", ckpt, "--data-path", prefix], capsys)
    assert rc == 2
    one_error_line(err, f"{prefix}.vocab.json", message, f"{ckpt}/vocab_layout.json")


def test_the_trainer_exits_2_on_shards_of_another_layout(tmp_path):
    import dataclasses

    layout = dataclasses.replace(LAYOUT, num_sentinels=4)
    prefix = write_dataset(tmp_path / "other", text_only_corpus(np.random.default_rng(0), 60, layout), layout)
    ckpt = _checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "MEGATRON_JAM_LOG_LEVEL": "WARNING"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "megatron_jam.pretrain", "--load", ckpt, "--data-path", prefix, "--train-iters", "2",
           "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr-warmup-iters", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr.splitlines(), f"{prefix}.vocab.json", "num_sentinels: 4")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _truncate(prefix):
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)


def _extend(prefix):
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0\0\0")


def _dtype_to_uint8(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.seek(17)
        f.write(bytes([1]))


CORRUPTIONS = {"bin_2_bytes_short": (_truncate, ".bin"), "bin_extra_bytes": (_extend, ".bin"),
               "idx_dtype_uint8": (_dtype_to_uint8, ".idx")}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_bin_that_does_not_match_its_index_is_refused_before_training_and_evaluation(tmp_path, capsys, kind):
    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.data import build_data_sources

    corrupt, where = CORRUPTIONS[kind]
    prefix = write_dataset(tmp_path / "d", text_only_corpus(np.random.default_rng(0), 100))
    corrupt(prefix)
    with pytest.raises(ConfigError, match=f"{prefix}{where}"):
        build_data_sources(_train_args(prefix, tmp_path), SimpleNamespace(vocab_size=512))
    ckpt = _checkpoint(tmp_path / "ckpt")
    rc, err = run_inprocess("evaluate", ["--load", ckpt, "--data-path", prefix], capsys)
    assert rc == 2
    one_error_line(err, f"{prefix}{where}")
    rc, err = run_inprocess("inspect_dataset", [prefix], capsys)
    assert rc == 2
    one_error_line(err, f"{prefix}{where}")


# ---------------------------------------------------------------- 6. a small corpus, the default split
def test_a_small_corpus_with_the_default_split_trains_or_says_why(tmp_path):
    """~100 documents and Megatron's default --split 969,30,1 (97 / 3 / 0 documents): training and
    evaluation build without hanging; 10 documents (10 / 0 / 0) with --eval-interval is one line."""
    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.data import build_data_sources

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"building the data hung ({HANG} s)"))
    signal.alarm(HANG)
    try:
        prefix = write_dataset(tmp_path / "small", text_only_corpus(np.random.default_rng(2), 100))
        train, valid = build_data_sources(_train_args(prefix, tmp_path), SimpleNamespace(vocab_size=512))
        assert len(train.dataset) >= 2 and valid == {}
        train, valid = build_data_sources(_train_args(prefix, tmp_path, "--eval-interval", "1"),
                                          SimpleNamespace(vocab_size=512))
        assert set(valid) == {"valid"} and valid["valid"].sources == [(prefix, range(97, 100))]  # per document
        tiny = write_dataset(tmp_path / "tiny", text_only_corpus(np.random.default_rng(3), 10))
        with pytest.raises(ConfigError, match=rf"^{re.escape(tiny)}: split 969,30,1 gives 0 validation documents out "
                                              r"of 10 .*\(e\.g\. --split 90,10,0\)$"):
            build_data_sources(_train_args(tiny, tmp_path, "--eval-interval", "1"), SimpleNamespace(vocab_size=512))
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------- 7. an image path that is a folder
def test_an_image_path_that_is_a_folder_says_so(tmp_path):
    from megatron_jam.data.image_tokenizer import ImageError, load_image

    (tmp_path / "pics.png").mkdir()
    with pytest.raises(ImageError, match="pics.png is a directory"):
        load_image(str(tmp_path / "pics.png"))
