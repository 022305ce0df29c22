"""Top-level entry point, as Megatron-LM's pretrain_gpt.py: `torchrun pretrain_jam.py [flags]`."""

from megatron_jam.training.loop import main

if __name__ == "__main__":
    main()
