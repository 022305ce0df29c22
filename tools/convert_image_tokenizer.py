"""Convert Chameleon's released image tokenizer (vqgan.ckpt + vqgan.yaml) once into a folder that encodes and decodes.

    python tools/convert_image_tokenizer.py --load chameleon/tokenizer/vqgan.ckpt \
        --config chameleon/tokenizer/vqgan.yaml --save hf/chameleon-vq
    python tools/convert_image_tokenizer.py --load vqgan.ckpt --config hf/chameleon-7b/config.json \
        --save hf/chameleon-vq

`--config` is Meta's Taming-style yaml or a transformers config.json (a `chameleon_vqgan` one, or a
whole Chameleon model's, whose `vq_config` is used). The checkpoint is read with
`torch.load(weights_only=True)` only: a file holding anything but tensors and plain containers is
refused without running any of it. Names and shapes are checked against the config before anything
is written. The output, for `--image-tokenizer` everywhere: `config.json`, `model.safetensors`
(what `transformers.ChameleonVQVAE.from_pretrained` loads) and `decoder.safetensors` (the VQGAN
decoder under its original `decoder.*` names; megatron_jam/data/chameleon_vqgan.py).

Exit codes: 0 done (a JSON summary on stdout), 2 the conversion is impossible (one line naming the
file and tensor), nothing written.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, run_cli  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chameleon vqgan.ckpt -> safetensors folder with the VQGAN decoder")
    p.add_argument("--load", required=True, help="the released tokenizer checkpoint (vqgan.ckpt, or .safetensors)")
    p.add_argument("--config", required=True, help="vqgan.yaml, or a transformers config.json (chameleon[_vqgan])")
    p.add_argument("--save", required=True, help="output folder (must not exist or be empty)")
    add_debug_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jam.data.chameleon_vqgan import convert_tokenizer

    summary = convert_tokenizer(args.load, args.config, args.save)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
