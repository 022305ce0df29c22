"""`python -m megatron_jam.harness ARGS` = `lm_eval ARGS` with `--model megatron_jam` registered.

Every flag is lm-eval's own (`--tasks`, `--num_fewshot`, `--batch_size`, `--output_path`, `--include_path`,
`--limit`, ...); `--model_args` takes the adapter's (`megatron_jam.harness.adapter.MegatronJamLM`). A setup
mistake (no tokenizer, no layout, a bad path) is one line and exit code 2, as in every tool of the project.
"""

import sys

from megatron_jam.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    import megatron_jam.harness  # noqa: F401  (registers the model before lm-eval looks it up)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]  # lm-eval's parser reads sys.argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
