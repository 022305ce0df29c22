"""lm-evaluation-harness adapter: `--model megatron_jam` scores any lm-eval task on any of our checkpoints.

Why a registration by import: lm-eval (0.4) looks a model name up in its registry, which holds its own models
and the classes registered (`@register_model`) by modules already imported; it has no plugin entry point and
`--include_path` loads task YAMLs, not models. So `lm_eval --model megatron_jam` alone does not find it; these do
(docs/evaluation.md)::

    python -m megatron_jam.harness --model megatron_jam --model_args load=CKPT --tasks piqa,arc_easy
    torchrun --nproc-per-node 2 tools/eval_harness.py --load CKPT --tasks piqa --output results.json
    import megatron_jam.harness; lm_eval.simple_evaluate(model="megatron_jam", model_args="load=CKPT", ...)

The first is lm-eval's own command line (every `lm_eval` flag) with the adapter imported; the second runs the
model tensor-parallel under torchrun.
"""

try:
    import lm_eval  # noqa: F401
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError("lm-eval is not installed: pip install 'megatron-jam[eval]' (lm-eval==0.4.13)") from e

from megatron_jam.harness.adapter import MegatronJamLM  # noqa: E402  (registers --model megatron_jam)

__all__ = ["MegatronJamLM"]
