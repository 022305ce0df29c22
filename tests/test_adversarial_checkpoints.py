"""Checkpoints and runs as a hostile or unlucky user meets them (docs/reliability.md, "Checkpoints and runs").

One tiny single-stack run (3 iterations, checkpoints at 2 and 3) is trained once in this process; each
probe damages a copy of it. Every probe asserts the exit code, the one-line message, that no planted code
ran, and that what was good is still usable.
"""

import contextlib
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest

from tool_loader import load_tool

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "examples", "configs", "parent_llm_tiny.json")
FLAGS = ["--model-config", TINY, "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", "16",
         "--lr", "1e-3", "--log-interval", "1"]
BASE = FLAGS + ["--lr-warmup-iters", "0"]


def _pretrain(argv: list[str]) -> int:
    from megatron_jam.pretrain import cli

    return cli(argv)


def _error(capsys) -> str:
    """The tool's stderr: exactly one line, starting with 'error:'."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def run(single_rank, tmp_path_factory):
    """A trained run folder: iter_0000002, iter_0000003 (latest), model_config.json, metrics.jsonl."""
    root = tmp_path_factory.mktemp("adversarial") / "run"
    assert _pretrain(BASE + ["--train-iters", "3", "--save-interval", "2", "--save", str(root)]) == 0
    assert sorted(os.listdir(root / "iter_0000003"))  # written
    return root


def _copy(run, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


class _Payload:
    """Runs a shell command when unpickled (what a planted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_metadata(ckpt, marker):
    (ckpt / "iter_0000003" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))


# ---------------------------------------------------------------- planted pickles: no reader runs them


def test_planted_metadata_is_refused_by_training_load(run, tmp_path, capsys):
    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    _plant_metadata(ckpt, marker)
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert f"{ckpt}/iter_0000003/.metadata: refused to load" in err and "posix.system" in err
    assert "iter_0000002 is complete: load it with --ckpt-step 2" in err
    assert not marker.exists()


def test_planted_common_state_is_refused(run, tmp_path, capsys):
    import torch

    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    torch.save({"iteration": _Payload(marker)}, ckpt / "iter_0000003" / "common.pt")
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    assert "iter_0000003/common.pt: refused to load" in _error(capsys)
    assert not marker.exists()


def test_planted_byte_item_is_refused(run, tmp_path, capsys):
    """A non-tensor item of a shard (the RNG state), which PyTorch loads with pickle, pointed at a payload."""
    import io

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    it = ckpt / "iter_0000003"
    md = pickle.loads((it / ".metadata").read_bytes())  # our own fresh file
    index = next(i for i in md.storage_data if i.fqn.startswith("rng_state"))
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    shard = it / md.storage_data[index].relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = _StorageInfo(md.storage_data[index].relative_path, offset, len(buf.getvalue()))
    (it / ".metadata").write_bytes(pickle.dumps(md))
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert f"{shard} (item rng_state" in err and "refused to load" in err and "posix.system" in err
    assert not marker.exists()


def test_planted_pickle_is_refused_by_evaluate(run, tmp_path, capsys):
    from eval_helpers import eval_docs, write_documents

    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    _plant_metadata(ckpt, marker)
    write_documents(str(tmp_path / "mm"), eval_docs())
    argv = ["--load", str(ckpt), "--data-path", str(tmp_path / "mm"), "--seq-length", "8"]
    assert load_tool("evaluate").main(argv) == 2
    assert ".metadata: refused to load" in _error(capsys)
    assert not marker.exists()
    assert load_tool("evaluate").main(argv + ["--ckpt-step", "2"]) == 0  # the earlier checkpoint it names


def test_planted_pickle_is_refused_by_generate(run, tmp_path, capsys):
    from megatron_jam.data.vocab import VocabLayout

    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    _plant_metadata(ckpt, marker)
    VocabLayout(text_vocab_size=300, codebook_size=16, tokens_per_image=4, num_sentinels=2).to_json(
        tmp_path / "layout.json")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    argv = ["--load", str(ckpt), "--vocab-layout", str(tmp_path / "layout.json"), "--prompts-file",
            str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out"), "--max-new-tokens", "2",
            "--no-progress-bar"]
    assert load_tool("generate_interleaved").main(argv) == 2
    assert ".metadata: refused to load" in _error(capsys)
    assert not marker.exists()


def test_planted_pickle_is_refused_in_a_converter_parent(run, tmp_path, capsys):
    ckpt, marker = _copy(run, tmp_path), tmp_path / "ran"
    _plant_metadata(ckpt, marker)
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(ckpt), "--save", str(tmp_path / "out")]) == 2
    assert ".metadata: refused to load" in _error(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the same parent, unharmed, converts
    assert tool.main(["--method", "import", "--load", str(run), "--save", str(tmp_path / "good")]) == 0


# ---------------------------------------------------------------- incomplete checkpoints, --ckpt-step


def test_truncated_shard_names_the_file_and_the_earlier_checkpoint(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    shard = ckpt / "iter_0000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert f"{shard}: truncated" in err and "iter_0000002 is complete: load it with --ckpt-step 2" in err


def test_missing_shard_is_named(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    for it in ("iter_0000002", "iter_0000003"):
        (ckpt / it / "__0_1.distcp").unlink()
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert f"{ckpt}/iter_0000003/__0_1.distcp: missing" in err and "holds no earlier complete checkpoint" in err


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _escape(it):
    """.metadata pointing a tensor at a file outside the checkpoint folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = pickle.loads((it / ".metadata").read_bytes())
    index, info = next(iter(md.storage_data.items()))
    md.storage_data[index] = _StorageInfo("../../../etc/hostname", info.offset, info.length)
    (it / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("damage,file,message", [
    (lambda it: _cut(it / ".metadata"), ".metadata", "unreadable, truncated or corrupt"),
    (lambda it: _cut(it / "common.pt"), "common.pt", "unreadable, truncated or corrupt"),
    (_escape, ".metadata", "names a data file outside the checkpoint folder ('../../../etc/hostname')"),
    (lambda it: (it / "metadata.json").write_text('{"sharded_backend": "zarr", "common_backend": "torch"}'),
     "metadata.json", "expected {'sharded_backend': 'torch_dist'"),
], ids=["cut-metadata", "cut-common", "path-outside", "other-backend"])
def test_damaged_checkpoint_files_are_named(run, tmp_path, capsys, damage, file, message):
    ckpt = _copy(run, tmp_path)
    damage(ckpt / "iter_0000003")
    assert _pretrain(BASE + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert f"{ckpt}/iter_0000003/{file}: " in err and message in err, err
    assert "iter_0000002 is complete: load it with --ckpt-step 2" in err


def test_checkpoint_of_another_architecture_is_one_line(run, tmp_path, capsys):
    cfg = json.loads(open(TINY).read())
    cfg["parent"]["ffn_hidden_size"] = 96
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    argv = BASE[:BASE.index("--model-config")] + ["--model-config", str(tmp_path / "other.json")] + BASE[2:]
    assert _pretrain(argv + ["--train-iters", "4", "--load", str(run)]) == 2
    err = _error(capsys)
    assert f"{run}/iter_0000003: cannot be loaded (CheckpointingException: Global shape mismatch" in err, err
    assert "--ckpt-step" not in err  # an earlier checkpoint would not fit either


def test_ckpt_step_resumes_that_iteration_exactly(run, tmp_path):
    from megatron_jam.training.loop import main

    ckpt = _copy(run, tmp_path)
    history = main(BASE + ["--train-iters", "3", "--load", str(ckpt), "--ckpt-step", "2"])
    logged = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in history] == [3]
    assert history[0]["lm_loss"] == next(r["lm_loss"] for r in logged if r["iteration"] == 3)  # bit-identical


def test_resume_with_another_seq_length_is_refused(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    argv = BASE[:BASE.index("--seq-length")] + ["--seq-length", "32"] + BASE[BASE.index("--seq-length") + 2:]
    assert _pretrain(argv + ["--train-iters", "4", "--load", str(ckpt)]) == 2
    err = _error(capsys)
    assert "trained with --seq-length 16, this run has 32" in err and "--finetune" in err


@contextlib.contextmanager
def _warnings():
    """The warnings the library logs meanwhile (its logger does not propagate to pytest's)."""
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("megatron_jam").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("megatron_jam").removeHandler(handler)


def test_resume_with_another_global_batch_size_says_so(run, tmp_path):
    from megatron_jam.training.loop import main

    ckpt = _copy(run, tmp_path)
    argv = BASE[:BASE.index("--global-batch-size")] + ["--global-batch-size", "2"] + BASE[
        BASE.index("--global-batch-size") + 2:]
    with _warnings() as records:
        history = main(argv + ["--train-iters", "4", "--load", str(ckpt)])
    assert [(r["iteration"], r["consumed_samples"]) for r in history] == [(4, 5)]  # 3 samples, then 2 more
    assert any("--global-batch-size 2 (trained with 1)" in r.getMessage() for r in records)


# ---------------------------------------------------------------- runs: lock, warm-up, ports, outputs, metrics


def _hold_lock(save):
    """Another process holding `<save>/.lock` as a run would (no torch: fcntl and json only)."""
    code = ("import fcntl, json, os, socket, sys, time\n"
            "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.truncate(0); f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), "
            "'started': time.time()})); f.flush()\n"
            "print('locked', flush=True); time.sleep(120)\n")
    os.makedirs(save, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(save / ".lock")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _two_rank_run(save: str) -> int:
    gbs = BASE.index("--global-batch-size") + 1
    return _pretrain(BASE[:gbs] + ["2"] + BASE[gbs + 1:] + ["--train-iters", "4", "--save", save])


def test_second_run_on_one_save_is_refused_and_a_dead_holder_is_taken_over(run, pool2, tmp_path, capsys):
    save = _copy(run, tmp_path)
    holder = _hold_lock(save)
    try:
        assert _pretrain(BASE + ["--train-iters", "4", "--save", str(save)]) == 2
        err = _error(capsys)
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}, started" in err
        assert pool2.run(_two_rank_run, str(save)) == [2, 2]  # every rank stops (no hang in a collective)
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with _warnings() as records:
        assert _pretrain(BASE + ["--train-iters", "4", "--save", str(save)]) == 0  # the dead holder's lock is taken
    assert any(f"taking over the lock of a run that ended without releasing it (pid {holder.pid}" in r.getMessage()
               for r in records)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (save / ".lock").read_text() == ""  # released at the end


def test_short_run_with_the_default_warmup(single_rank, tmp_path, capsys):
    assert _pretrain(FLAGS + ["--train-iters", "2"]) == 0
    assert _pretrain(FLAGS + ["--train-iters", "2", "--lr-warmup-iters", "2"]) == 2
    assert "--lr-warmup-iters=2 must be smaller than --lr-decay-iters=2" in _error(capsys)


def test_single_process_tool_does_not_need_port_29500(tmp_path):
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
    except OSError:
        pass  # already taken by someone else: the same situation
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    code = ("import megatron_jam, torch.distributed as d\n"
            "from megatron_jam.parallel.initialize import initialize_distributed\n"
            "initialize_distributed(); print('world', d.get_world_size())\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        busy.close()
    assert out.returncode == 0 and "world 1" in out.stdout, out.stderr[-2000:]


def test_save_that_is_a_file_or_unwritable(single_rank, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _pretrain(BASE + ["--train-iters", "1", "--save", str(tmp_path / "file")]) == 2
    assert f"--save {tmp_path / 'file'}: is a file, not a folder" in _error(capsys)
    assert _pretrain(BASE + ["--train-iters", "1", "--save", str(tmp_path / "file" / "run")]) == 2
    assert "cannot be created" in _error(capsys)
    assert _pretrain(BASE + ["--train-iters", "1", "--save", "/proc/megatron_jam_test/run"]) == 2
    assert "--save /proc/megatron_jam_test/run: cannot be written" in _error(capsys)
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(tmp_path), "--save", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in _error(capsys)
    evaluate = load_tool("evaluate")
    assert evaluate.main(["--load", str(tmp_path), "--data-path", "x", "--output", "/proc/megatron_jam/x.json"]) == 2
    assert "--output /proc/megatron_jam/x.json: its folder cannot be written" in _error(capsys)


def test_truncated_safetensors_parent(single_rank, tmp_path, capsys):
    from parent_helpers import make_llama

    make_llama(tmp_path / "hf", seed=3)
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(tmp_path / "hf"), "--save", str(tmp_path / "out")]) == 2
    assert f"{f}: the file is truncated" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_parent_with_nan_or_inf_is_refused(single_rank, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from parent_helpers import make_llama

    make_llama(tmp_path / "hf", seed=4)
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = float("nan")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, f, metadata={"format": "pt"})
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(tmp_path / "hf"), "--save", str(tmp_path / "out")]) == 2
    assert f"tensor {name} has 1 NaN and 1 Inf values" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_megatron_jam_parent_with_inf_is_refused(run, tmp_path, capsys):
    """The same check on a megatron-jam parent (read through dist_checkpointing, one part at a time)."""
    from megatron_jam.convert.checkpoint import CheckpointWriter, load_state_on_one_rank
    from megatron_jam.convert.common import parent_parts, part_of
    from megatron_jam.models.kinds import load_model_config

    cfg = load_model_config(str(run))
    state = load_state_on_one_rank(str(run), cfg)
    name = "decoder.layers.2.mlp.linear_fc2.weight"
    state[name][1, 1] = float("inf")
    with CheckpointWriter(cfg, str(tmp_path / "bad")) as writer:
        writer.write(parent_parts(cfg.parent), lambda part: {k: v for k, v in state.items() if part_of(k) == part})
        writer.finish({"method": "test"})
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(tmp_path / "bad"), "--save", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'bad'}: tensor {name} has 0 NaN and 1 Inf values" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_metrics_keep_one_row_per_step_after_a_resume(run, tmp_path):
    """A run that logged iteration 3 and died before checkpointing it: the resumed run logs 3 again, once."""
    save = _copy(run, tmp_path)
    shutil.rmtree(save / "iter_0000003")
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lm_lo')  # a line cut by the kill
    assert _pretrain(BASE + ["--train-iters", "3", "--save", str(save)]) == 0
    rows = [json.loads(x) for x in open(save / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    before = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert rows[2]["lm_loss"] == before[2]["lm_loss"]  # the replayed step is the same step
