"""Transformer Engine layer specs (same model code, other spec): only where CUDA and TE exist.

On CPU-only machines these skip; the local specs are covered everywhere else.
Part of the GPU suite (`MEGATRON_JAM_TEST_GPU=1`, see conftest.py).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA (Transformer Engine specs)")]


def test_te_specs_match_local_specs(single_rank):
    pytest.importorskip("transformer_engine", reason="transformer_engine not installed")
    from megatron_jam.models.config import JamCrossConfig, ParentConfig
    from megatron_jam.models.jam_cross import JamCrossModel

    p = ParentConfig(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     add_bias_linear=False)
    cfg = JamCrossConfig(llm=p, img=p, vocab_size=100, cross_every=1, cross_zero_init=False)
    torch.manual_seed(0)
    local = JamCrossModel(cfg).cuda().eval()
    te = JamCrossModel(cfg, use_te=True).cuda().eval()
    sd = {k: v for k, v in local.state_dict().items() if "_extra_state" not in k}
    te_keys = {k for k in te.state_dict() if "_extra_state" not in k}
    mapped = {k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
               .replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
              if k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
               .replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_") in te_keys else k: v
              for k, v in sd.items()}
    te.load_state_dict(mapped, strict=False)
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    pos = torch.arange(16, device="cuda").expand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(te(ids, pos), local(ids, pos), rtol=1e-3, atol=1e-3)
