"""`python -m megatron_jam.pretrain [Megatron-style flags]`: JAM-Cross pretraining (see examples/)."""

from megatron_jam.training.loop import main

if __name__ == "__main__":  # dist_checkpointing's writer re-imports entry scripts with spawn
    main()
