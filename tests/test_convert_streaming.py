"""The converter's streaming writer (megatron_jam/convert/streaming.py) and JAM-Cross's new blocks.

What makes the converter's memory bounded is that every part is converted
exactly once, in order, and written before the next one is made; these tests
check that property directly (the memory figures themselves are in
benchmarks/bench_convert_memory.py, never asserted here), that what was
written is what the trainer loads, and how JAM-Cross's new blocks start.
"""

import os

import pytest
import torch

from megatron_jam.convert.common import EMB, ConvertError, parent_parts, part_of
from parent_helpers import V, convert, make_llama, make_opt


def _tiny_llama_config(vocab=V):
    from megatron_jam.models.config import ParentConfig
    from megatron_jam.models.config import JamGPTConfig

    p = ParentConfig(family="llama", num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=64, max_position_embeddings=64)
    return JamGPTConfig(parent=p, vocab_size=vocab, share_embeddings_and_output_weights=False, seq_length=16)


def _random_parts(cfg):
    """part -> canonical tensors for every tensor of the model (vocabulary tables unpadded)."""
    from megatron_jam.convert.checkpoint import build_meta

    gen = torch.Generator().manual_seed(0)
    parts = {}
    for k, t in build_meta(cfg).state_dict().items():
        if isinstance(t, torch.Tensor):
            shape = (cfg.vocab_size, *t.shape[1:]) if k.endswith("word_embeddings.weight") or \
                k == "output_layer.weight" else t.shape
            parts.setdefault(part_of(k), {})[k] = torch.randn(shape, generator=gen)
    return parts


def test_each_part_is_converted_once_in_order_and_loads_back(single_rank, tmp_path):
    from megatron_jam.convert.checkpoint import CheckpointWriter, load_state_on_one_rank

    cfg = _tiny_llama_config()
    made = _random_parts(cfg)
    order = parent_parts(cfg.parent)
    calls = []

    def convert_part(part):
        calls.append(part)
        return dict(made[part])

    with CheckpointWriter(cfg, str(tmp_path / "ck")) as w:
        w.write(order, convert_part)
        w.finish({"method": "test"})
    assert calls == order  # one pass, in order: one part in memory at a time
    files = sorted(f for f in os.listdir(tmp_path / "ck") if f.endswith(".distcp"))
    assert len(files) == len(order) + 1  # a file per part, plus the (tiny) extra-state objects
    state = load_state_on_one_rank(str(tmp_path / "ck"), cfg)
    for part, tensors in made.items():
        for k, t in tensors.items():
            got = state[k][: t.shape[0]]
            assert torch.equal(got, t), k  # SwiGLU fc1 is saved as two halves: both came back
            if k == EMB:
                assert not state[k][t.shape[0]:].any()  # padded rows are zero


@pytest.mark.parametrize("fault", ["extra", "missing", "shape"])
def test_writer_errors_name_the_tensor_and_leave_nothing(single_rank, tmp_path, fault):
    from megatron_jam.convert.checkpoint import CheckpointWriter

    cfg = _tiny_llama_config()
    made = _random_parts(cfg)
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    if fault == "extra":
        made[1]["decoder.layers.1.surprise.weight"] = torch.zeros(2)
        message = "decoder.layers.1.surprise.weight has no place"
    elif fault == "missing":
        del made[1][key]
        message = f"no converted tensor for {key}"
    else:
        made[1][key] = torch.zeros(3, 3)
        message = rf"tensor {key}: converted shape \(3, 3\) != model shape \(32, 32\)"
    with pytest.raises(ConvertError, match=message):
        with CheckpointWriter(cfg, str(tmp_path / "ck")) as w:
            w.write(parent_parts(cfg.parent), lambda part: dict(made[part]))
            w.finish({})
    assert os.listdir(tmp_path) == []


def test_bf16_conversion_stores_bf16(single_rank, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    hf = make_llama(tmp_path / "a")
    convert("import", tmp_path / "ck", tmp_path / "a", bf16=True)
    meta = FileSystemReader(str(tmp_path / "ck")).read_metadata().state_dict_metadata
    assert meta[EMB].properties.dtype == torch.bfloat16
    assert meta["decoder.layers.self_attention.linear_qkv.weight"].properties.dtype == torch.bfloat16
    from megatron_jam.convert.checkpoint import build_meta
    from megatron_jam.convert.streaming import load_parts
    from megatron_jam.models.kinds import load_model_config

    sharded = build_meta(load_model_config(str(tmp_path / "ck")), bf16=True).sharded_state_dict()
    got = load_parts(sharded, [EMB], str(tmp_path / "ck"))[EMB][:V]
    assert torch.equal(got, hf.get_input_embeddings().weight.detach().to(torch.bfloat16))


def test_cross_new_blocks_start_as_the_model_initialises_them(single_rank, tmp_path):
    from megatron_jam.models.kinds import load_model_config
    from parent_helpers import state_of

    make_llama(tmp_path / "llm", seed=1)
    make_opt(tmp_path / "img", seed=2, vocab=V + 60)
    convert("cross", tmp_path / "x", tmp_path / "llm", tmp_path / "img", cross_every=1)
    cfg = load_model_config(str(tmp_path / "x"))
    state = state_of(tmp_path / "x")
    std = 0.02  # Megatron's init_method_std default, which the parents' configs keep
    for stream in ("llm", "img"):
        for k in range(cfg.num_cross_pairs):
            pre = f"{stream}_cross.layers.{k}."
            for name in ("cross_attention.linear_q.weight", "cross_attention.linear_kv.weight",
                         "mlp.linear_fc1.weight"):
                w = state[pre + name]
                assert 0.5 * std < w.std().item() < 1.5 * std, (pre + name, w.std())
            for name in ("cross_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
                assert not state[pre + name].any(), pre + name  # zero: streams are their parents at step 0
    assert not torch.equal(state["llm_cross.layers.0.cross_attention.linear_q.weight"],
                           state["llm_cross.layers.1.cross_attention.linear_q.weight"])  # a seed per block
    d = cfg.llm.hidden_size
    eye = torch.eye(d)
    assert torch.equal(state["fusion.weight"], torch.cat([eye, eye], dim=1) * 0.5)


def test_rows_read_slices_of_a_safetensors_table(tmp_path):
    from safetensors.torch import save_file

    from megatron_jam.convert.readers import read_safetensors

    table, bias = torch.randn(37, 5).to(torch.bfloat16), torch.randn(3)
    save_file({"table": table, "bias": bias, "scalar": torch.tensor(2.5)}, str(tmp_path / "m.safetensors"))
    got = read_safetensors(str(tmp_path / "m.safetensors"), ["table", "bias", "scalar"], lazy={"table"})
    rows = got["table"]
    assert not isinstance(rows, torch.Tensor) and tuple(rows.shape) == (37, 5) and rows.dtype == torch.bfloat16
    assert torch.equal(rows[:], table) and torch.equal(rows[10:17], table[10:17])
    assert torch.equal(rows[3], table[3]) and torch.equal(rows[-1], table[-1]) and rows[40:].shape == (0, 5)
    assert torch.equal(got["bias"], bias) and got["scalar"].item() == 2.5
    padded = torch.zeros(40, 5, dtype=torch.bfloat16)
    rows.read_into(padded)
    assert torch.equal(padded[:37], table) and not padded[37:].any()
    with open(tmp_path / "m.safetensors", "r+b") as f:  # keep the header and 10 bytes of data
        f.truncate(8 + int.from_bytes(f.read(8), "little") + 10)
    with pytest.raises(ConvertError, match="is truncated"):
        read_safetensors(str(tmp_path / "m.safetensors"), ["table"], lazy={"table"})["table"][:]


def test_checkpoint_rows_load_slices_of_a_stored_table(single_rank, tmp_path):
    from megatron_jam.convert.readers import MegatronParent

    hf = make_llama(tmp_path / "a")
    convert("import", tmp_path / "ck", tmp_path / "a")
    rows = MegatronParent(str(tmp_path / "ck")).read("embedding")[EMB]
    table = hf.get_input_embeddings().weight.detach()
    assert not isinstance(rows, torch.Tensor) and tuple(rows.shape) == tuple(table.shape)  # padding cut off
    assert torch.equal(rows[:], table) and torch.equal(rows[7:30], table[7:30]) and torch.equal(rows[-1], table[-1])
    padded = torch.ones(V + 28, table.shape[1])
    rows.read_into(padded)
    assert torch.equal(padded[:V], table) and (padded[V:] == 1).all()
