"""`python -m megatron_jam.pretrain [Megatron-style flags]`: JAM continued pretraining (see examples/).

Exit codes: 0 done, 2 the run cannot start or continue as asked (bad flags, a `--save` another run
holds, a checkpoint that is incomplete or not safe to load): one line on stderr, from rank 0 (`--debug`
or MEGATRON_JAM_DEBUG=1 for the traceback).
"""

import sys


def _main(argv: list[str]) -> None:
    # The flags are parsed before torch and Megatron-Core are imported: `--help` and flag errors are instant.
    from megatron_jam.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(argv)
    cfg = validate_args(args)  # a bad flag or path: one line, before Megatron-Core is even imported
    from megatron_jam.training.loop import pretrain

    pretrain(args, cfg)


def cli(argv: list[str] | None = None) -> int:
    """The command line: the run, with the errors a user can fix reported as one line and exit code 2."""
    from megatron_jam.utils.cli import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":  # dist_checkpointing's writer re-imports entry scripts with spawn
    sys.exit(cli())
