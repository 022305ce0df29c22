"""The study's steps, each a run of a project tool: world -> VQ -> shards -> parents -> variants -> instruction tuning.

Why this order and sharing: the paper compares fusion methods from the *same*
parents, so the world, the VQ tokenizer, the shards and both parents are built
once; every variant then gets the same token budget (steps x global batch x
sequence length), learning rate and data order for a given seed. Held-out
validation data is a second world drawn with another seed (other pictures and
sentences of the same closed language), tokenized with the first world's
tokenizers: the study's "Wikipedia" (text only) and "MS-COCO" (image-text) sets.
Both parents share one architecture, the CM3leon-style one of
examples/configs/parent_img_tiny.json, as in the paper (section 3.1: "an LLM with
the same architecture as CM3leon"); weight averaging (JAM-Uniform) and width
concatenation (JAM-Width) need that. The flags copy
examples/tiny/run_tiny_jam_cross.sh, which is known to work.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Dict, List

from megatron_jam.study.config import INSTRUCT_BASE, INSTRUCT_VARIANTS, VARIANTS, StudyConfig, Variant
from megatron_jam.study.instruct_world import write_instructions
from megatron_jam.study.jobs import Runner, StudyError, run_parallel

HELDOUT_SEED_OFFSET = 1000
"""The held-out world's seed is the training world's plus this: other documents, the same language."""
PARENT_CONFIG = "examples/configs/parent_img_tiny.json"
"""Both parents' architecture (scaled by --num-layers / --hidden-size)."""


class Study:
    """Paths and commands of one study run (``cfg.output``); each public method is one stage."""

    def __init__(self, cfg: StudyConfig, repo: str) -> None:
        self.cfg, self.repo = cfg, repo
        self.out = os.path.abspath(cfg.output)
        self.work = os.path.join(self.out, "work")
        self.world, self.heldout = os.path.join(self.work, "world"), os.path.join(self.work, "heldout-world")
        self.data, self.vq = os.path.join(self.work, "data"), os.path.join(self.work, "vq")
        self.runner = Runner(repo, self.out, resume=cfg.resume)
        self.py = cfg.python
        self.pretrained: Dict[int, threading.Event] = {s: threading.Event() for s in cfg.seeds}

    # ------------------------------------------------------------------ commands
    def tool(self, script: str, *args) -> List[str]:
        return [self.py, os.path.join(self.repo, "tools", script), *map(str, args)]

    def trainer(self, *args) -> List[str]:
        """`python -m megatron_jam.pretrain` (torchrun --standalone when --nproc > 1) with the common flags."""
        if self.cfg.nproc > 1:
            launch = [self.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.cfg.nproc)]
        else:
            launch = [self.py]
        iters = int(args[list(args).index("--train-iters") + 1])
        warmup = min(4, max(1, iters // 4))  # run_tiny's 4 warm-up steps; fewer in very short runs (tests)
        common = ["--seq-length", self.cfg.seq_length, "--lr-warmup-iters", warmup, "--lr-decay-style", "cosine",
                  "--weight-decay", 0.01, "--clip-grad", 1.0, "--split", "95,5,0"]
        return launch + ["-m", "megatron_jam.pretrain", *map(str, common), *map(str, args)]

    def preprocess(self, inputs: List[str], prefix: str, *extra) -> List[str]:
        return self.tool("preprocess_interleaved.py", "--tokenizer-model", os.path.join(self.world, "spm.model"),
                         "--input", *inputs, "--output-prefix", prefix, "--num-sentinels", 8, "--workers", 1,
                         "--no-progress-bar", *extra)

    # ------------------------------------------------------------------ stage 1: worlds and parent configs
    def worlds(self) -> None:
        """The training world and the held-out world, at once."""
        c = self.cfg
        counts = lambda n_text, n_img, n_il: ["--num-text-docs", n_text, "--num-image-text-docs", n_img,  # noqa: E731
                                              "--num-interleaved-docs", n_il]
        train = [self.py, "-m", "megatron_jam.data.picture_world", self.world, "--seed", c.seeds[0],
                 *counts(c.text_docs, c.image_text_docs, c.interleaved_docs)]
        held = [self.py, "-m", "megatron_jam.data.picture_world", self.heldout, "--seed",
                c.seeds[0] + HELDOUT_SEED_OFFSET, *counts(c.heldout_docs, c.heldout_docs, c.heldout_docs // 5)]
        run_parallel([lambda: self.runner.run("world", list(map(str, train))),
                      lambda: self.runner.run("heldout_world", list(map(str, held)))], self.cfg.jobs)
        self.write_parent_configs()

    def write_parent_configs(self) -> None:
        """The parents' config (one architecture for both), scaled by --num-layers / --hidden-size."""
        os.makedirs(os.path.join(self.work, "configs"), exist_ok=True)
        for name in ("llm", "img"):
            with open(os.path.join(self.repo, PARENT_CONFIG)) as f:
                cfg = json.load(f)
            parent, ratio = cfg["parent"], cfg["parent"]["ffn_hidden_size"] // cfg["parent"]["hidden_size"]
            parent.update(num_layers=self.cfg.num_layers, hidden_size=self.cfg.hidden_size,
                          ffn_hidden_size=ratio * self.cfg.hidden_size,
                          max_position_embeddings=max(parent["max_position_embeddings"], 2 * self.cfg.seq_length))
            cfg["seq_length"] = self.cfg.seq_length
            with open(self.parent_config(name), "w") as f:
                json.dump(cfg, f, indent=1)

    def parent_config(self, name: str) -> str:
        return os.path.join(self.work, "configs", f"parent_{name}.json")

    # ------------------------------------------------------------------ stage 2: VQ tokenizer || LLM parent
    def vq_and_llm(self) -> None:
        """The LLM parent needs text only: it trains on one core while the VQ tokenizer trains on the other."""
        run_parallel([self._llm_parent, self._vq], self.cfg.jobs)

    def _vq(self) -> None:
        w = self.world
        self.runner.run("vq", self.tool("train_image_tokenizer.py", "--input", f"{w}/imgtext.jsonl",
                                        f"{w}/interleaved.jsonl", "--save", self.vq, "--num-threads", 1,
                                        "--train-iters", self.cfg.vq_iters, "--seed", self.cfg.seeds[0]))

    def _llm_parent(self) -> None:
        prefix = os.path.join(self.data, "text-only")
        self.runner.run("shard_text_only", self.preprocess([f"{self.world}/text.jsonl"], prefix,
                                                           "--codebook-size", 1, "--tokens-per-image", 1))
        self.runner.run("train_llm_parent", self.trainer(
            "--model-config", self.parent_config("llm"), "--data-path", prefix, "--no-cm3",
            "--train-iters", self.cfg.llm_iters, "--micro-batch-size", 4, "--global-batch-size", 8,
            "--lr", 3e-3, "--min-lr", 3e-4, "--log-interval", 10, "--seed", self.cfg.seeds[0],
            "--save", os.path.join(self.work, "llm")))

    # ------------------------------------------------------------------ stage 3: shards, image parent
    def shard(self, name: str) -> str:
        return os.path.join(self.data, name)

    def shards(self) -> None:
        """Training shards (text, image-text, instructions) and held-out shards, all in the text shard's layout."""
        vq = ["--image-tokenizer", self.vq]
        self.runner.run("shard_text", self.preprocess([f"{self.world}/text.jsonl"], self.shard("text"), *vq))
        layout = ["--vocab-layout", self.shard("text") + ".vocab.json"]
        w, h = self.world, self.heldout
        instruct = write_instructions(os.path.join(self.work, "instruct"), self.cfg.instruct_docs, self.cfg.seeds[0])
        tasks = [
            lambda: self.runner.run("shard_imgtext", self.preprocess(
                [f"{w}/imgtext.jsonl", f"{w}/interleaved.jsonl"], self.shard("imgtext"), *vq, *layout)),
            lambda: self.runner.run("shard_heldout_text", self.preprocess(
                [f"{h}/text.jsonl"], self.shard("heldout-text"), *vq, *layout)),
            lambda: self.runner.run("shard_heldout_imgtext", self.preprocess(
                [f"{h}/imgtext.jsonl", f"{h}/interleaved.jsonl"], self.shard("heldout-imgtext"), *vq, *layout)),
            lambda: self.runner.run("shard_instruct", self.tool(
                "preprocess_instruct.py", "--tokenizer-model", f"{w}/spm.model", "--input", instruct,
                "--output-prefix", self.shard("instruct"), "--num-sentinels", 8, *vq, *layout)),
        ]
        run_parallel(tasks, self.cfg.jobs)

    def image_parent(self) -> None:
        """The CM3leon-style parent on image-text with the CM3 objective (run_tiny's flags)."""
        mbs = 16 // self.cfg.nproc
        self.runner.run("train_img_parent", self.trainer(
            "--model-config", self.parent_config("img"), "--data-path", self.shard("imgtext"),
            "--train-iters", self.cfg.img_iters, "--global-batch-size", 16, "--micro-batch-size", mbs,
            "--lr", 5e-3, "--min-lr", 3e-4, "--log-interval", 20, "--seed", self.cfg.seeds[0],
            "--save", os.path.join(self.work, "img")))

    def parent_evals(self) -> None:
        """The parents as reference rows: the image-text parent on both held-out sets and its prompt following
        (paper Table 2's CM3leon), the LLM parent on held-out text in its own text-only layout."""
        img, llm = os.path.join(self.work, "img"), os.path.join(self.work, "llm")

        def llm_text() -> None:
            self.runner.run("shard_heldout_text_only", self.preprocess(
                [f"{self.heldout}/text.jsonl"], self.shard("heldout-text-only"), "--codebook-size", 1,
                "--tokens-per-image", 1, "--vocab-layout", self.shard("text-only") + ".vocab.json"))
            self.evaluate("parents/llm", llm, "heldout-text-only", os.path.join(llm, "eval_text.json"))

        image = lambda: self.evaluate("parents/img", img, "heldout-imgtext", f"{img}/eval_image.json")  # noqa: E731
        text = lambda: self.evaluate("parents/img", img, "heldout-text", f"{img}/eval_text.json")  # noqa: E731
        pictures = lambda: self.prompt_following("parents/img", img, self.cfg.seeds[0])  # noqa: E731
        run_parallel([llm_text, image, text, pictures], self.cfg.jobs)
        self.write_params(img)
        self.write_params(llm)

    # ------------------------------------------------------------------ measurements
    def evaluate(self, step: str, load: str, shard: str, output: str) -> None:
        self.runner.run(f"{step}/eval_{shard}", self.tool(
            "evaluate.py", "--load", load, "--data-path", self.shard(shard), "--micro-batch-size", 4,
            "--max-windows", self.cfg.eval_windows, "--output", output))

    def prompt_following(self, step: str, load: str, seed: int) -> None:
        self.runner.run(f"{step}/prompt_following", self.tool(
            "evaluate_generation.py", "--load", load, "--tokenizer-model", f"{self.world}/spm.model",
            "--image-tokenizer", self.vq, "--prompts-file", f"{self.world}/prompts.jsonl",
            "--cfg-scale", *self.cfg.cfg_scales, "--samples-per-prompt", self.cfg.samples_per_prompt,
            "--seed", seed, "--no-progress-bar", "--output", os.path.join(load, "prompt_following.json")))

    def measure(self, step: str, load: str, seed: int) -> None:
        """Text PPL, image-text PPL and prompt following of one trained model, written next to it."""
        self.evaluate(step, load, "heldout-text", os.path.join(load, "eval_text.json"))
        self.evaluate(step, load, "heldout-imgtext", os.path.join(load, "eval_image.json"))
        self.prompt_following(step, load, seed)

    @staticmethod
    def write_params(folder: str) -> None:
        """``params.json``: the model's parameter count (megatron_jam.models.param_count) from its config."""
        from megatron_jam.models.kinds import load_model_config
        from megatron_jam.models.param_count import model_params

        with open(os.path.join(folder, "params.json"), "w") as f:
            json.dump({"params": int(model_params(load_model_config(folder)))}, f)

    # ------------------------------------------------------------------ stage 4: the fusion variants
    def variant_dir(self, seed: int, name: str) -> str:
        return os.path.join(self.out, "variants", str(seed), name)

    def variant(self, seed: int, v: Variant) -> None:
        """Merge the parents with `v`'s method, continue pretraining on the 50/50 blend, measure."""
        trained, step = os.path.join(self.variant_dir(seed, v.name), "train"), f"{seed}/{v.name}"
        try:
            self.merge_and_train(seed, v, trained)
        finally:  # also on failure: its instruction tuning must not wait for ever
            if v.name == INSTRUCT_BASE:
                self.pretrained[seed].set()
        self.measure(step, trained, seed)

    def merge_and_train(self, seed: int, v: Variant, trained: str) -> None:
        c, step = self.cfg, f"{seed}/{v.name}"
        init = os.path.join(self.variant_dir(seed, v.name), "init")
        self.runner.run(f"{step}/convert", self.tool(
            "convert_checkpoint.py", *v.convert_args, "--llm", os.path.join(self.work, "llm"),
            "--img", os.path.join(self.work, "img"), "--vocab-layout", self.shard("text") + ".vocab.json",
            "--seq-length", c.seq_length, "--seed", seed, "--save", init),
            before_retry=lambda: shutil.rmtree(init, ignore_errors=True))  # it refuses a non-empty --save
        self.write_params(init)
        self.runner.run(f"{step}/train", self.trainer(
            "--load", init, "--data-path", 0.5, self.shard("text"), 0.5, self.shard("imgtext"),
            "--train-iters", c.train_iters, "--global-batch-size", c.global_batch,
            "--micro-batch-size", c.global_batch // c.nproc, "--lr", 3e-3, "--min-lr", 1e-4,
            "--log-interval", max(1, c.train_iters // 20), "--seed", seed, "--save", trained,
            "--save-interval", c.train_iters))

    # ------------------------------------------------------------------ stage 5: instruction tuning (Table 5)
    def instruct(self, seed: int, name: str) -> None:
        """Instruction-tune the pretrained JAM-Cross (k=2): the instructions alone, or blended 50/50 with
        image-text pretraining data; paper section 3.1: no CM3, weights only, a third of the pretraining lr."""
        c = self.cfg
        self.pretrained[seed].wait()
        base = os.path.join(self.variant_dir(seed, INSTRUCT_BASE), "train")
        if not os.path.exists(os.path.join(base, "latest_checkpointed_iteration.txt")):
            raise StudyError(f"seed {seed}: no trained {INSTRUCT_BASE} in {base} to instruction-tune")
        data = [self.shard("instruct")] if name == "instruct-only" else \
            [0.5, self.shard("instruct"), 0.5, self.shard("imgtext")]
        trained = os.path.join(self.variant_dir(seed, name), "train")
        self.runner.run(f"{seed}/{name}/train", self.trainer(
            "--load", base, "--finetune", "--no-cm3",
            "--data-path", *data, "--train-iters", c.instruct_iters, "--global-batch-size", c.global_batch,
            "--micro-batch-size", c.global_batch // c.nproc, "--lr", 1e-3, "--min-lr", 1e-4,
            "--log-interval", max(1, c.instruct_iters // 20), "--seed", seed, "--save", trained,
            "--save-interval", c.instruct_iters))
        self.write_params(trained)
        self.measure(f"{seed}/{name}", trained, seed)

    def variants_and_instruction_tuning(self) -> None:
        """Every variant for every seed, then the instruction tuning of each seed's JAM-Cross k=2, in one pool:
        k=2 is queued first, so its instruction tuning runs beside the other variants."""
        chosen = [v for v in VARIANTS if v.name in self.cfg.variants]
        order = sorted(chosen, key=lambda v: v.name != INSTRUCT_BASE)
        tasks = [lambda s=s, v=v: self.variant(s, v) for s in self.cfg.seeds for v in order]
        tasks += [lambda s=s, n=n: self.instruct(s, n) for s in self.cfg.seeds for n in INSTRUCT_VARIANTS
                  if n in self.cfg.variants]
        run_parallel(tasks, self.cfg.jobs)

    # ------------------------------------------------------------------ all
    def run(self) -> None:
        """Every stage in order (each stage's independent jobs run `--jobs` at a time)."""
        for stage in (self.worlds, self.vq_and_llm, self.shards, self.image_parent, self.parent_evals,
                      self.variants_and_instruction_tuning):
            stage()
