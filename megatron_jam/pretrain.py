"""`python -m megatron_jam.pretrain [Megatron-style flags]`: JAM-Cross pretraining (see examples/).

Exit codes: 0 done, 2 the run cannot start or continue as asked (bad flags, a `--save` another run
holds, a checkpoint that is incomplete or not safe to load): one line on stderr, from rank 0.
"""

import sys


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main`, with the errors a user can fix reported as one line and exit code 2."""
    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.loop import main
    from megatron_jam.training.run_lock import RunLockError
    from megatron_jam.utils.logging import global_rank
    from megatron_jam.utils.safe_checkpoint import CheckpointError

    try:
        main(argv)
    except (ConfigError, CheckpointError, RunLockError) as e:
        if global_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer re-imports entry scripts with spawn
    sys.exit(cli())
