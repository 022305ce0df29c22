"""Every private Megatron-Core / torch name the project touches exists, with the signature it relies on.

Checked in a fresh interpreter that never imports megatron_jam, so nothing has been patched yet: after
`import megatron_jam` the CPU layer has replaced several of these names, and a check made then could not
fail (the old tests/test_platform.py check had that blind spot). A Megatron-Core or torch upgrade that moves
or reshapes one of them fails here, naming it, before the equivalence tests would fail for unclear reasons.
"""

import json
import subprocess
import sys

PROBE = r'''
import importlib, inspect, json
def sig(path):
    module, _, name = path.rpartition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return "<no signature>"
out = {}
for path in PATHS:
    try:
        out[path] = sig(path)
    except Exception as e:
        out[path] = "MISSING: %s: %s" % (type(e).__name__, e)
import megatron.core.optimizer.clip_grads as cg, megatron.core.optimizer.optimizer as op
out["same clip function"] = op.clip_grad_by_total_norm_fp32 is cg.clip_grad_by_total_norm_fp32
print("RESULT" + json.dumps(out))
'''

EXPECTED = {
    # megatron_jam/platform.py: the CPU RNG layer and the clipping patch
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": ["device", "clone", "graph_safe"],
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": ["new_state", "device", "graph_safe"],
    "megatron.core.tensor_parallel.random:initialize_rng_tracker": [
        "use_te_rng_tracker", "inference_rng_tracker", "use_cudagraphable_rng", "force_reset"],
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add": ["self", "name", "seed"],
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork": ["self", "name"],
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.get_states": ["self"],
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.set_states": ["self", "states"],
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.reset": ["self"],
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": [
        "parameters", "max_norm", "total_norm", "use_decoupled_grad"],
    "torch.utils._device:_device_constructors": [],
    # megatron_jam/platform.py: the distributed optimizer's parameter sorting, run with CPU tensors typed as CUDA
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups": [
        "gbuf_ranges", "param_gbuf_map", "opt_group_ranges", "config"],
    # megatron_jam/utils/safe_checkpoint.py: the swapped reader and planner of the torch_dist strategy
    "megatron.core.dist_checkpointing.strategies.torch:_get_filesystem_reader": ["checkpoint_dir", "cache_metadata"],
    "megatron.core.dist_checkpointing.strategies.torch:MCoreLoadPlanner": "class",
    "megatron.core.dist_checkpointing.strategies.torch:TorchDistLoadShardedStrategy.load": [
        "self", "sharded_state_dict", "checkpoint_dir"],
    "torch.distributed.checkpoint._traverse:set_element": ["root_dict", "path", "value"],
    # megatron_jam/inference/stepper.py: a layer's pieces, run over new slots with a KV cache
    "megatron.core.transformer.transformer_layer:TransformerLayer._forward_mlp": [
        "self", "hidden_states", "inference_context", "padding_mask"],
    "megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors": [
        "self", "hidden_states", "key_value_states", "output_gate", "split_qkv"],
    "megatron.core.transformer.attention:CrossAttention.get_query_key_value_tensors": [
        "self", "hidden_states", "key_value_states", "output_gate", "split_qkv"],
    # megatron_jam/data/cm3_dataset.py: JamDataset's JAM rules before Megatron's indices are built
    "megatron.core.datasets.gpt_dataset:GPTDataset._build_document_sample_shuffle_indices": ["self"],
    # megatron_jam/models/jam_cross_loop.py: recomputation
    "megatron.core.tensor_parallel:checkpoint": ["function", "distribute_saved_activations", "args"],
}


def test_private_names_exist_with_the_signatures_we_use():
    paths = [p for p in EXPECTED]
    code = "PATHS = %r\n" % paths + PROBE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stderr[-2000:]
    found = json.loads(line[len("RESULT"):])
    assert found.pop("same clip function"), "megatron.core.optimizer.optimizer no longer re-exports clip_grads'"
    problems = {}
    for path, want in EXPECTED.items():
        got = found[path]
        if isinstance(got, str) and got.startswith("MISSING"):
            problems[path] = got
        elif want != "class" and got != want:
            problems[path] = f"parameters {got}, expected {want}"
    assert not problems, json.dumps(problems, indent=1)
