"""Checkpoints and failure handling of the training loop (2 gloo ranks, fp32, mock data).

A run saved at step 5 and resumed gives steps 6-10 bit-identical to the
uninterrupted run; a save that dies half-way leaves the previous checkpoint as
`latest` and loadable; a non-finite loss skips the update and is counted, and
too many in a row stop the run with a checkpoint; SIGTERM checkpoints and exits.
"""

import json
import math
import os
import signal

import pytest

BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--log-interval", "1", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--lr-decay-iters", "10"]
TP1 = BASE[:BASE.index("--tensor-model-parallel-size")] + ["--lr-decay-iters", "10"]


def _losses(history):
    return [r["lm_loss"] for r in history]


def _resume_body(root: str, extra: list):
    from megatron_jam.training.loop import main

    full = _losses(main(BASE + extra + ["--train-iters", "10", "--save", f"{root}/full", "--save-interval", "5"]))
    main(BASE + extra + ["--train-iters", "5", "--save", f"{root}/part"])
    resumed = main(BASE + extra + ["--train-iters", "10", "--load", f"{root}/part", "--save", f"{root}/part"])
    return full, _losses(resumed), [r["iteration"] for r in resumed]


@pytest.mark.parametrize("extra", [[], ["--async-save"]], ids=["sync-save", "async-save"])
def test_resume_is_bit_identical(pool2, tmp_path, extra):
    full, resumed, iterations = _last_stage(pool2.run(_resume_body, str(tmp_path), extra))
    assert iterations == [6, 7, 8, 9, 10]
    assert resumed == full[5:], (full, resumed)  # exact equality, fp32 on CPU
    lines = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    train = [x for x in lines if "lm_loss" in x]
    assert [x["iteration"] for x in train] == list(range(1, 11))
    for key in ("iteration", "lm_loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_sec"):
        assert key in train[0]
    assert (tmp_path / "full" / "model_config.json").exists()
    assert (tmp_path / "full" / "latest_checkpointed_iteration.txt").read_text() == "10"


def _last_stage(per_rank):
    for r in per_rank:
        if r[0] and not math.isnan(r[0][0]):
            return r
    raise AssertionError(per_rank)


def _crashed_save_body(root: str):
    from megatron_jam import checkpointing
    from megatron_jam.training.loop import main

    main(BASE + ["--train-iters", "3", "--save", root])
    original = checkpointing.dist_checkpointing.save

    def dies_half_way(state, path, *a, **k):
        open(os.path.join(path, "__partial.distcp"), "w").write("x")
        raise KeyboardInterrupt("killed during save")

    checkpointing.dist_checkpointing.save = dies_half_way
    try:
        main(BASE + ["--train-iters", "5", "--load", root, "--save", root])
        died = False
    except KeyboardInterrupt:
        died = True
    finally:
        checkpointing.dist_checkpointing.save = original
    latest = checkpointing.read_latest(root)
    history = main(BASE + ["--train-iters", "4", "--load", root])
    return died, latest, [r["iteration"] for r in history]


def test_save_killed_half_way_keeps_previous_latest(pool2, tmp_path):
    for died, latest, iterations in pool2.run(_crashed_save_body, str(tmp_path / "ckpt")):
        assert died
        assert latest == 3
        assert iterations == [4]  # the previous checkpoint loads and training continues


_CALLS = {"n": 0}


def _nan_at(calls: set):
    from megatron_jam.parallel.schedule import lm_forward_step

    def step(data_iterator, model):
        out, loss_fn = lm_forward_step(data_iterator, model)
        _CALLS["n"] += 1
        if _CALLS["n"] in calls:
            out = out * float("nan")
        return out, loss_fn

    return step


def _nonfinite_body(nan_calls: list, extra: list):
    from megatron_jam.training.arguments import build_parser, validate_args
    from megatron_jam.training.loop import TrainingStopped, train
    from megatron_jam.parallel.initialize import initialize_model_parallel

    _CALLS["n"] = 0
    args = build_parser().parse_args(BASE + ["--train-iters", "6"] + extra)
    cfg = validate_args(args)
    initialize_model_parallel(2, 1, seed=args.seed)
    try:
        history = train(args, cfg, forward_step_func=_nan_at(set(nan_calls)))
        return "finished", [(r["iteration"], r["skipped_iterations"], r["lm_loss"]) for r in history]
    except TrainingStopped as e:
        return "stopped", str(e)


def test_nonfinite_loss_skips_the_update_and_is_counted(pool2):
    # micro-batch 5 is the first of iteration 3 (2 micro-batches per iteration)
    status, steps = pool2.run(_nonfinite_body, [5], [])[0]
    assert status == "finished"
    skipped = [s for _, s, _ in steps]
    assert skipped == [0, 0, 1, 1, 1, 1]
    assert math.isnan(steps[2][2]) and all(math.isfinite(loss) for i, _, loss in steps if i != 3)


def test_skipped_count_survives_a_resume(pool2, tmp_path):
    status, steps = pool2.run(_nonfinite_body, [5], ["--train-iters", "4", "--save", str(tmp_path)])[0]
    assert status == "finished" and [s for _, s, _ in steps] == [0, 0, 1, 1]
    status, steps = pool2.run(_nonfinite_body, [], ["--train-iters", "6", "--save", str(tmp_path)])[0]
    assert status == "finished" and [(i, s) for i, s, _ in steps] == [(5, 1), (6, 1)]


def test_too_many_nonfinite_steps_stop_with_checkpoint(pool2, tmp_path):
    out = pool2.run(_nonfinite_body, list(range(1, 100)), ["--max-skipped-steps", "3", "--save", str(tmp_path)])
    status, message = out[0]
    assert status == "stopped" and "3 non-finite steps in a row" in message and "checkpoint saved" in message
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"


def _sigterm_body(root: str):
    from megatron_jam.training.arguments import build_parser, validate_args
    from megatron_jam.training.loop import train
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.parallel.schedule import lm_forward_step
    import torch.distributed as dist

    calls = {"n": 0}

    def step(data_iterator, model):
        calls["n"] += 1
        if calls["n"] == 7 and dist.get_rank() == 0:  # during iteration 4
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_forward_step(data_iterator, model)

    args = build_parser().parse_args(BASE + ["--train-iters", "20", "--save", root])
    cfg = validate_args(args)
    initialize_model_parallel(2, 1, seed=args.seed)
    history = train(args, cfg, forward_step_func=step)
    return history[-1]["iteration"]


def test_sigterm_checkpoints_and_exits(pool2, tmp_path):
    assert pool2.run(_sigterm_body, str(tmp_path)) == [4, 4]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"


def _layout_curve_body(init: str, layout: list):
    from megatron_jam.training.loop import main

    if not os.path.exists(os.path.join(init, "latest_checkpointed_iteration.txt")):
        main(TP1 + ["--train-iters", "0", "--save", init])  # TP=1 initial weights, iteration 0 (first call)
    return _losses(main(TP1 + ["--train-iters", "5", "--load", init, "--finetune"] + layout))


def test_tp2_and_pp2_give_the_per_step_losses_of_tp1(pool2, tmp_path):
    """Same start (a TP=1 checkpoint loaded with --finetune), 5 steps, within 1e-5 relative."""
    curves = {}
    for name, layout in {"tp1": [], "tp2": ["--tensor-model-parallel-size", "2"],
                         "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                         "pp2": ["--pipeline-model-parallel-size", "2"]}.items():
        per_rank = pool2.run(_layout_curve_body, str(tmp_path / "init"), layout)
        curves[name] = next(c for c in per_rank if not math.isnan(c[0]))
    ref = curves["tp1"]
    assert ref[-1] < ref[0]
    for name, curve in curves.items():
        for step, (a, b) in enumerate(zip(ref, curve)):
            assert abs(a - b) <= 1e-5 * abs(a), (name, step, ref, curve)


def _requeue_body(root: str):
    from megatron_jam.training.loop import main

    main(TP1 + ["--train-iters", "0", "--save", f"{root}/start"])
    first = main(TP1 + ["--train-iters", "3", "--load", f"{root}/start", "--finetune", "--save", f"{root}/run"])
    # the same command again (a Slurm requeue): continues from --save, not from --load
    again = main(TP1 + ["--train-iters", "5", "--load", f"{root}/start", "--finetune", "--save", f"{root}/run"])
    return [r["iteration"] for r in first], [r["iteration"] for r in again]


def test_resubmitted_run_resumes_from_its_save_dir(pool2, tmp_path):
    first, again = pool2.run(_requeue_body, str(tmp_path))[0]
    assert first == [1, 2, 3] and again == [4, 5]


def _relayout_body(root: str, resume_flags: list):
    from megatron_jam.training.loop import main

    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    main(TP1 + ["--train-iters", "0", "--save", f"{root}/init"])
    full = main(TP1 + tp2 + ["--train-iters", "6", "--load", f"{root}/init", "--finetune"])
    main(TP1 + tp2 + ["--train-iters", "3", "--load", f"{root}/init", "--finetune", "--save", f"{root}/part"])
    resumed = main(TP1 + resume_flags + ["--train-iters", "6", "--load", f"{root}/part"])
    return _losses(full), _losses(resumed), [r["iteration"] for r in resumed]


def test_resume_at_another_tensor_parallel_size(pool2, tmp_path):
    """A TP=2+SP checkpoint (weights, Adam state, scheduler) resumed at TP=1 x DP=2 continues the same curve
    (the per-rank RNG states have no counterpart there and are skipped, with a log line)."""
    full, resumed, iterations = _last_stage(pool2.run(_relayout_body, str(tmp_path), []))
    assert iterations == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert abs(a - b) <= 1e-5 * abs(a), (full, resumed)
