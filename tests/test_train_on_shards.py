"""The trainer on real indexed shards: a text-only + image-text blend with the CM3 objective,
named validation sets, per-modality losses in metrics.jsonl (2 gloo ranks, TP=2)."""

import json

import numpy as np

from jam_data_helpers import image_text_corpus, text_only_corpus, write_dataset


def _train(argv):
    from megatron_jam.training.loop import main

    return [(r["lm_loss"], r["text_loss"], r["image_loss"]) for r in main(argv)]


def test_blend_trains_and_reports_named_validation_sets(pool2, tmp_path):
    rng = np.random.default_rng(0)
    text = write_dataset(tmp_path / "text", text_only_corpus(rng, 300))
    imgtext = write_dataset(tmp_path / "imgtext", image_text_corpus(rng, 300))
    coco = write_dataset(tmp_path / "coco", image_text_corpus(rng, 60))
    save = tmp_path / "run"
    argv = ["--data-path", "0.5", text, "0.5", imgtext, "--split", "90,10,0", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1",
            "--valid-data-path", f"image={coco}", "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--save", str(save), "--data-cache-path", str(tmp_path / "cache")]
    per_rank = pool2.run(_train, argv)
    steps = per_rank[0]
    assert len(steps) == 8
    assert all(np.isfinite(s).all() for s in steps)  # every step had text and image targets
    assert steps[-1][0] < steps[0][0]
    records = [json.loads(x) for x in open(save / "metrics.jsonl")]
    valid = {(r["iteration"], r["valid_set"]) for r in records if "valid_set" in r}
    assert valid == {(4, "valid"), (4, "image"), (8, "valid"), (8, "image")}
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "8"
    from megatron_jam.data.vocab import VocabLayout, load_layout

    assert VocabLayout.from_json(str(save / "vocab_layout.json")) == load_layout(text)  # travels with the run
