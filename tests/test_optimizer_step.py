"""The trainer's optimizer step (`training/loop._optimizer_step`): one gradient-norm pass (prepare, norm, skip or
clip, `step_with_ready_grads`) gives exactly what Megatron-Core's `opt.step()` gives: the same losses, gradient
norms and parameters over 5 steps at DP=2 with clipping active, fp32 (the distributed optimizer has the same
step methods). The distributed optimizer itself, on gloo: the same losses as the replicated one, with
asynchronous reduce-scatters and parameter all-gathers too, checkpoints of gathered weights, exact resume."""

import math

import torch


def _legacy_step(opt, loss_is_finite):
    """The step before: norm for the skip decision, then `opt.step()` (which prepares and takes the norm again)."""
    opt.prepare_grads()
    grad_norm = opt.get_grad_norm()
    if not loss_is_finite or grad_norm is None or not math.isfinite(grad_norm):
        opt.zero_grad()
        return float("nan") if grad_norm is None else grad_norm, False
    ok, grad_norm, _ = opt.step()
    return grad_norm, bool(ok)


def _train(argv, legacy):
    from megatron_jam.training import loop

    original = loop._optimizer_step
    loop._optimizer_step = _legacy_step if legacy else original
    try:
        return [(r["lm_loss"], r["grad_norm"]) for r in loop.main(argv)]
    finally:
        loop._optimizer_step = original


def test_one_pass_step_equals_megatrons_step(pool2, tmp_path):
    common = ["--train-iters", "5", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100", "--clip-grad", "0.05"]
    from parent_helpers import state_of

    new = pool2.run(_train, common + ["--save", str(tmp_path / "new"), "--save-interval", "5"], False)[0]
    old = pool2.run(_train, common + ["--save", str(tmp_path / "old"), "--save-interval", "5"], True)[0]
    assert len(new) == 5 and new == old, (new, old)
    assert all(g > 0.05 for _, g in new), "clipping must be active for the test to mean much"
    a, b = state_of(tmp_path / "new"), state_of(tmp_path / "old")  # the latest checkpoint: iteration 5
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "parameters after 5 steps differ"


def _curve(argv):
    from megatron_jam.training.loop import main

    return [r["lm_loss"] for r in main(argv)]


def test_overlapped_gradient_reduction_gives_the_same_losses(pool2):
    """`--overlap-grad-reduce` with small buckets (several all-reduces started during the backward) at DP=2:
    the losses of the synchronous reduction."""
    common = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100"]
    ref = pool2.run(_curve, common)[0]
    got = pool2.run(_curve, common + ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"])[0]
    assert len(ref) == 4 and all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(ref, got)), (ref, got)


def test_background_data_workers_give_the_same_run_and_resume_exactly(pool2, tmp_path):
    """`--num-workers 2`: the same losses as batches built on the training thread (mock data and the CM3
    transform draw per sample index), and a run resumed from its checkpoint continues on the same samples."""
    common = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "4", "--log-interval", "100"]
    ref = pool2.run(_curve, common)[0]
    got = pool2.run(_curve, common + ["--num-workers", "2"])[0]
    assert ref == got, (ref, got)
    save = ["--save", str(tmp_path / "run"), "--save-interval", "2", "--num-workers", "2"]
    pool2.run(_curve, common[:1] + ["2"] + common[2:] + save)
    resumed = pool2.run(_curve, common + save)[0]
    assert resumed == ref[2:], (resumed, ref)


_FIVE_STEPS = ["--train-iters", "5", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
               "--lr", "3e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "5", "--log-interval", "100"]
_DIST_OPT = _FIVE_STEPS + ["--use-distributed-optimizer"]
_SMALL_BUCKETS = ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"]  # 24 buckets of this model


def _close(ref, got, rel=1e-6):
    return len(ref) == len(got) and all(abs(a - b) <= rel * abs(a) for a, b in zip(ref, got))


def test_distributed_optimizer_gives_the_same_losses_and_gathers_before_saving(pool2, tmp_path):
    """`--use-distributed-optimizer` at DP=2 (gloo; `platform._patch_distributed_optimizer`): the losses of the
    replicated optimizer over 5 steps; with `--overlap-grad-reduce --overlap-param-gather` and 24 buckets
    (asynchronous reduce-scatters and all-gathers, each gather waited for by the forward) the losses of the
    distributed optimizer alone. The checkpoint written right after the last step holds the gathered weights:
    bit for bit those of the same run without `--overlap-param-gather` (without
    `checkpointing._gather_updated_parameters` the other rank's shards are one update old: 5e-4 off)."""
    from parent_helpers import state_of

    ref = pool2.run(_curve, _FIVE_STEPS)[0]
    dist_opt = pool2.run(_curve, _DIST_OPT)[0]
    assert _close(ref, dist_opt), (ref, dist_opt)
    save = ["--save-interval", "5", "--save"]
    buckets = pool2.run(_curve, _DIST_OPT + _SMALL_BUCKETS + save + [str(tmp_path / "sync_gather")])[0]
    overlap = pool2.run(_curve, _DIST_OPT + _SMALL_BUCKETS + ["--overlap-param-gather"] + save +
                        [str(tmp_path / "overlap_gather")])[0]
    assert _close(dist_opt, overlap) and buckets == overlap, (dist_opt, buckets, overlap)
    a, b = state_of(tmp_path / "sync_gather"), state_of(tmp_path / "overlap_gather")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)


def test_distributed_optimizer_with_overlapped_gather_resumes_exactly(pool2, tmp_path):
    """Distributed optimizer with `--overlap-param-gather` at DP=2: saved at step 3 and resumed (its Adam shards,
    step count and the scheduler), steps 4-5 are those of the uninterrupted run, bit for bit."""
    argv = _DIST_OPT + _SMALL_BUCKETS + ["--overlap-param-gather"]
    full = pool2.run(_curve, argv)[0]
    save = ["--save", str(tmp_path / "run"), "--save-interval", "3"]
    pool2.run(_curve, ["--train-iters", "3"] + argv[2:] + save)
    resumed = pool2.run(_curve, argv + save)[0]
    assert resumed == full[3:], (resumed, full)
