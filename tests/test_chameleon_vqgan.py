"""Chameleon's VQGAN decoder (megatron_jam/data/chameleon_vqgan.py) and tools/convert_image_tokenizer.py.

A tiny VQGAN (transformers' `ChameleonVQVAE` encoder and quantizer + our decoder) trained here for 250
steps on eight Pillow-drawn shapes reconstructs them, decode(encode(x)); the decoder at the released
configuration has exactly the tensor names and shapes listed in docs/real_parents.md; the conversion tool
turns a Lightning-style .ckpt of that tiny model into a folder that `VQImageTokenizer` encodes and decodes
with; a planted pickle is refused and runs nothing."""

import json
import os
import pickle
import re

import pytest

from tool_loader import load_tool

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "real_parents.md")
SIZE = 32
COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20), (150, 40, 180), (20, 180, 190),
           (250, 120, 10), (40, 40, 40)]
TINY = dict(embed_dim=8, num_embeddings=64, latent_channels=32, resolution=SIZE, base_channels=32,
            channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8])
"""Three levels (32 -> 8 latent grid, 64 codes per image), attention at the 8x8 level of encoder and decoder."""
STEPS, LR = 250, 2e-3
MSE_BOUND = 0.03
"""Reconstruction MSE (pixels in [-1, 1]) after STEPS: measured 0.0070, 0.0086, 0.0089 on seeds 0, 1, 2
(untrained 0.93-1.12; predicting the mean image 0.215): the bound leaves 3x margin over the worst seed and
is 7x below the mean image."""
TAMING_YAML = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 64
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
"""


def draw(i: int):
    """Shape i: rectangle, ellipse or triangle (i % 3) in colour i % 8 on white, shifted by i % 4."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d, colour, o = ImageDraw.Draw(image), COLOURS[i % 8], 2 * (i % 4)
    box = [4 + o, 5, 22 + o, 26 - o]
    if i % 3 == 0:
        d.rectangle(box, fill=colour)
    elif i % 3 == 1:
        d.ellipse(box, fill=colour)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    return image


def _pixels(images):
    """Chameleon's preprocessing, pixel * 0.0078 - 1, as `VQImageTokenizer` applies it."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) * 0.0078 - 1
                                      for im in images]))


def reconstruction_mse(vq, decoder, x) -> float:
    """MSE of decode(encode(x)) against x, through the codes (hard quantization)."""
    import torch
    import torch.nn.functional as F

    from megatron_jam.data.chameleon_vqgan import decode_codes

    vq.eval()
    decoder.eval()
    with torch.no_grad():
        codes = vq.encode(x).image_tokens.reshape(len(x), SIZE // 4, SIZE // 4)
        return F.mse_loss(decode_codes(vq, decoder, codes).clamp(-1, 1), x).item()


def train(vq, decoder, x) -> None:
    """Pixel MSE + the quantizer's codebook and commitment terms, straight-through gradients, Adam."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam([*vq.parameters(), *decoder.parameters()], lr=LR)
    vq.train()
    decoder.train()
    for _ in range(STEPS):
        out = vq.encode(x)
        y = decoder(vq.post_quant_conv(out.quantized_last_hidden_state))
        loss = F.mse_loss(y, x) + out.embedding_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained():
    """(config, trained ChameleonVQVAE, trained decoder, images, untrained MSE, trained MSE); one thread."""
    import torch
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    from megatron_jam.data.chameleon_vqgan import ChameleonVQGANDecoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        config = ChameleonVQVAEConfig(**TINY)
        vq, decoder = ChameleonVQVAE(config), ChameleonVQGANDecoder(config)
        images = [draw(i) for i in range(8)]
        x = _pixels(images)
        before = reconstruction_mse(vq, decoder, x)
        train(vq, decoder, x)
        after = reconstruction_mse(vq, decoder, x)
    finally:
        torch.set_num_threads(threads)
    return config, vq, decoder, images, before, after


def test_trained_tiny_vqgan_reconstructs_its_inputs(trained):
    _, _, _, _, before, after = trained
    assert after < MSE_BOUND, (before, after)
    assert after < before / 20, (before, after)


def _documented_names() -> dict:
    """name -> shape from the text block of docs/real_parents.md's "Chameleon's image tokenizer decoder"."""
    with open(DOCS) as f:
        doc = f.read()
    section = doc.split("Chameleon's image tokenizer decoder\n", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    rows = [line.split() for line in block.strip().splitlines()]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


def test_released_config_names_and_shapes_match_the_docs():
    """Decoder on the meta device at the released vqgan.yaml values (transformers' defaults but
    attn_resolutions, which the yaml gives as [])."""
    from transformers import ChameleonVQVAEConfig

    from megatron_jam.data.chameleon_vqgan import expected_shapes

    config = ChameleonVQVAEConfig(attn_resolutions=[])
    assert (config.embed_dim, config.num_embeddings, config.latent_channels, config.resolution,
            config.base_channels, list(config.channel_multiplier), config.num_res_blocks, config.dropout,
            config.double_latent) == (256, 8192, 256, 512, 128, [1, 1, 2, 2, 4], 2, 0.0, False)
    hf, decoder = expected_shapes(config)
    ours = {**decoder, **{k: hf[k] for k in ("post_quant_conv.weight", "post_quant_conv.bias",
                                              "quantize.embedding.weight")}}
    documented = _documented_names()
    assert list(ours) == list(documented)
    assert ours == documented
    assert len(decoder) == 164 and len(hf) == 129


def _fake_ckpt(path, vq, decoder, extra=None):
    """A Lightning-style checkpoint of plain containers: state_dict (original names, a training-loss
    tensor among them) and a step counter."""
    import torch

    state = {**vq.state_dict(), **{"decoder." + k: v for k, v in decoder.state_dict().items()},
             "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    state.update(extra or {})
    torch.save({"state_dict": state, "global_step": 250}, path)


def _convert(ckpt, config, save):
    """tools/convert_image_tokenizer.py run in-process; returns its exit code."""
    return load_tool("convert_image_tokenizer").main(["--load", str(ckpt), "--config", str(config),
                                                     "--save", str(save)])


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """The trained tiny VQGAN as a .ckpt + Taming yaml, converted by the tool."""
    _, vq, decoder, _, _, _ = trained
    root = tmp_path_factory.mktemp("vqgan")
    _fake_ckpt(root / "vqgan.ckpt", vq, decoder)
    (root / "vqgan.yaml").write_text(TAMING_YAML)
    assert _convert(root / "vqgan.ckpt", root / "vqgan.yaml", root / "out") == 0
    return root


def test_conversion_writes_transformers_and_decoder_files(trained, converted):
    import torch
    from safetensors.torch import load_file
    from transformers import ChameleonVQVAE

    config, vq, decoder, images, _, _ = trained
    out = converted / "out"
    assert sorted(os.listdir(out)) == ["config.json", "decoder.safetensors", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "chameleon_vqgan"
    dec = load_file(out / "decoder.safetensors")
    assert set(dec) == {"decoder." + k for k in decoder.state_dict()}
    assert all(torch.equal(dec["decoder." + k], v) for k, v in decoder.state_dict().items())
    loaded = ChameleonVQVAE.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    assert set(load_file(out / "model.safetensors")) == set(vq.state_dict())
    x = _pixels(images)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).image_tokens, vq.eval().encode(x).image_tokens)


def test_conversion_accepts_a_transformers_config_json(converted, tmp_path):
    config = json.loads((converted / "out" / "config.json").read_text())
    whole = tmp_path / "config.json"
    whole.write_text(json.dumps({"model_type": "chameleon", "vq_config": config}))
    assert _convert(converted / "vqgan.ckpt", whole, tmp_path / "out") == 0
    assert (tmp_path / "out" / "decoder.safetensors").stat().st_size == \
        (converted / "out" / "decoder.safetensors").stat().st_size


@pytest.mark.parametrize("case", ["shape", "missing", "unknown"])
def test_conversion_errors_name_file_and_tensor(trained, converted, tmp_path, capsys, case):
    import torch

    _, vq, decoder, _, _, _ = trained
    name = "decoder.up.0.block.1.conv2.weight"
    extra = {"shape": {name: torch.zeros(3, 3)}, "missing": {}, "unknown": {"decoder.up.9.conv.weight": torch.zeros(1)}}
    ckpt = tmp_path / "bad.ckpt"
    _fake_ckpt(ckpt, vq, decoder, extra[case])
    if case == "missing":
        state = torch.load(ckpt, weights_only=True)
        del state["state_dict"][name]
        torch.save(state, ckpt)
    assert _convert(ckpt, converted / "vqgan.yaml", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt) in err, err
    assert ("decoder.up.9.conv.weight" if case == "unknown" else name) in err, err
    assert not (tmp_path / "out").exists()


class _Planted:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle's code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused_and_runs_nothing(converted, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # cannot override an explicit weights_only=True

    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Planted(proof)))  # the payload works when unpickled freely
    assert proof.exists()
    marker, ckpt = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "callbacks": _Planted(marker)}, ckpt)
    assert _convert(ckpt, converted / "vqgan.yaml", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt) in err and "refused" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["checkpoint", "config"])
def test_unreadable_inputs_are_one_line_errors(converted, tmp_path, capsys, what):
    junk = tmp_path / ("junk.ckpt" if what == "checkpoint" else "junk.yaml")
    junk.write_text("model: {params: {ddconfig: {ch: many}}}\n" if what == "config" else "not a checkpoint\n")
    ckpt, config = (junk, converted / "vqgan.yaml") if what == "checkpoint" else (converted / "vqgan.ckpt", junk)
    assert _convert(ckpt, config, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(junk) in err, err
    assert not (tmp_path / "out").exists()


def test_tokenizer_encodes_and_decodes_the_converted_folder(trained, converted, tmp_path):
    import shutil

    import numpy as np

    from megatron_jam.data.image_tokenizer import VQImageTokenizer

    _, _, _, images, _, after = trained
    out = converted / "out"
    vq = VQImageTokenizer(str(out))
    assert vq.has_decoder and vq.grid == (8, 8) and vq.tokens_per_image == 64
    codes = vq.encode_images(images)
    decoded = [vq.decode_grid(c, vq.grid) for c in codes]
    assert all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in decoded)
    mse = np.mean([((np.asarray(d, np.float32) - np.asarray(i, np.float32)) * 0.0078) ** 2
                   for d, i in zip(decoded, images)])
    assert mse < MSE_BOUND, (mse, after)  # the trained model's error, through uint8 images
    encode_only = tmp_path / "encode_only"
    shutil.copytree(out, encode_only)
    os.remove(encode_only / "decoder.safetensors")
    plain = VQImageTokenizer(str(encode_only))
    assert not plain.has_decoder and plain.identity == vq.identity  # the decoder is not part of the identity


def test_tokenizer_refuses_a_decoder_file_of_another_shape(converted, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_jam.data.image_tokenizer import VQImageTokenizer

    folder = tmp_path / "bad"
    shutil.copytree(converted / "out", folder)
    tensors = load_file(folder / "decoder.safetensors")
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"][:2].clone()
    save_file(tensors, folder / "decoder.safetensors")
    with pytest.raises(ValueError, match=r"decoder\.safetensors.*decoder\.conv_out\.bias"):
        VQImageTokenizer(str(folder))
