"""Top-level entry point, as Megatron-LM's pretrain_gpt.py: `torchrun pretrain_jam.py [flags]`."""

import sys

from megatron_jam.pretrain import cli

if __name__ == "__main__":
    sys.exit(cli())
