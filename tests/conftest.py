"""Shared fixtures: one gloo worker pool per world size for the whole session (start-up paid once).

Two suites share this folder. By default the CPU suite runs (what CI runs): GPUs are hidden from
this process and its workers before torch initialises CUDA, so a GPU machine takes the same code
path (the CPU layer, gloo) as CI, and the `gpu` tests skip. `MEGATRON_JAM_TEST_GPU=1` runs the
GPU suite instead: only tests marked `gpu` (tests/test_gpu.py, tests/test_gpu_specs.py), with
CUDA visible; see docs/gpu.md.

Also the tiny worlds that more than one test module builds on (defined once here rather than imported
from a test module): `gentool`, the JAM-Cross checkpoint, sentencepiece model and Janus VQ of the
generation tool tests, and `tiny_clip`, a random 2-layer CLIP for the retrieval tests.
"""

import io
import json
import os
import random
import warnings

import pytest

GPU_SUITE = os.environ.get("MEGATRON_JAM_TEST_GPU") == "1"
if not GPU_SUITE:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
os.environ.setdefault("MEGATRON_JAM_LOG_LEVEL", "WARNING")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


def pytest_collection_modifyitems(config, items):
    """The GPU suite runs only `gpu` tests; the CPU suite skips them."""
    for item in items:
        is_gpu = item.get_closest_marker("gpu") is not None
        if GPU_SUITE and not is_gpu:
            item.add_marker(pytest.mark.skip(reason="CPU-suite test (run without MEGATRON_JAM_TEST_GPU=1)"))
        elif not GPU_SUITE and is_gpu:
            item.add_marker(pytest.mark.skip(reason="GPU suite: MEGATRON_JAM_TEST_GPU=1 on a CUDA machine"))


@pytest.fixture(scope="session")
def pool2():
    from megatron_jam.testing.distributed import WorkerPool

    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def single_rank():
    """This process as a one-rank world (gloo; NCCL in the GPU suite, as the trainer picks) with
    Megatron parallel state at TP=1, PP=1."""
    import torch
    import torch.distributed as dist

    import megatron_jam  # noqa: F401
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.testing.distributed import _free_port

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    initialize_model_parallel(1, 1, seed=1234)
    yield


@pytest.fixture(scope="module")
def gentool(tmp_path_factory):
    """(root, layout): a tiny JAM-Cross checkpoint (Llama + OPT, random), a 64-piece sentencepiece model, a
    tiny Janus VQ (with a decoder) and a tiny ChameleonVQVAE, the layout, and a prompts file, all under root
    (tests/test_generate_tool.py, tests/test_generation_retrieval.py)."""
    import sentencepiece as spm
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig, JanusVQVAE, JanusVQVAEConfig

    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank
    from megatron_jam.data.image_tokenizer import VQImageTokenizer
    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.inference.loading import file_identity
    from parent_helpers import convert, make_llama, make_opt
    from text_helpers import sentence

    ensure_single_rank()
    root = tmp_path_factory.mktemp("gentool")
    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([sentence(rng) for _ in range(300)]), model_writer=model,
                                   vocab_size=64, model_type="unigram", hard_vocab_limit=False,
                                   character_coverage=1.0, normalization_rule_name="identity")
    (root / "spm.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    JanusVQVAE(JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                                channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], num_patches=4)
               ).save_pretrained(root / "janus")
    ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=32,
                                        base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
                                        attn_resolutions=[])).save_pretrained(root / "chameleon")
    vq = VQImageTokenizer(str(root / "janus"))
    layout = VocabLayout(text_vocab_size=sp.get_piece_size(), codebook_size=16, tokens_per_image=vq.tokens_per_image,
                         num_sentinels=2, text_tokenizer=file_identity(str(root / "spm.model"), "sentencepiece"),
                         image_tokenizer=vq.identity)
    layout.to_json(root / "layout.json")
    make_llama(root / "llm", seed=1, vocab=layout.text_vocab_size, initializer_range=0.3)
    make_opt(root / "img", seed=2, vocab=layout.vocab_size, init_std=0.3)
    convert("cross", root / "ckpt", root / "llm", root / "img", vocab_layout=str(root / "layout.json"),
            seq_length=64)
    prompts = [{"prompt": "ka lo mi ter", "start_with_image": True, "name": "picture"},
               {"prompt": "san bu ra ne"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root, layout


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Folder of a random 2-layer CLIPModel with a character-level tokenizer and its processor
    (tests/test_retrieval.py, tests/test_generation_retrieval.py)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(d)
    return str(d)
