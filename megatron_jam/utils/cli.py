"""How every command of the project ends on a mistake the user can fix: one line on stderr, exit code 2.

Why: a wrong path or a bad combination of flags is a sentence, and an 11-line traceback buries it (and
looks like a bug). The exceptions that mean "the input or the flags are wrong" are the project's own error
types (all `ValueError`s except the run lock's) and the file-system errors of a bad path; anything else
is a bug and keeps its traceback. `--debug` (every tool has it, `add_debug_arg`) or `MEGATRON_JAM_DEBUG=1`
shows the traceback of a user error too. Only rank 0 writes the line, as Megatron-LM's `print_rank_0`.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "MEGATRON_JAM_DEBUG"
EXIT_USER_ERROR = 2

# (module, class) of the project's user-error types. Looked up in sys.modules when an exception escapes:
# an error class whose module was never imported cannot have been raised, and importing it then would
# cost the start-up time this module exists to keep short.
USER_ERRORS = (
    ("megatron_jam.models.config", "ConfigError"),
    ("megatron_jam.data.vocab", "VocabLayoutError"),
    ("megatron_jam.data.text_tokenizer", "TextTokenizerError"),
    ("megatron_jam.data.integrity", "DatasetFileError"),
    ("megatron_jam.data.image_format", "ImageFormatError"),
    ("megatron_jam.data.image_tokenizer", "ImageError"),
    ("megatron_jam.data.publish", "OutputExistsError"),
    ("megatron_jam.data.documents", "EncodingFailure"),
    ("megatron_jam.utils.safe_checkpoint", "CheckpointError"),
    ("megatron_jam.utils.safe_checkpoint", "UnsafePickleError"),
    ("megatron_jam.training.run_lock", "RunLockError"),
    ("megatron_jam.convert.common", "ConvertError"),
    ("megatron_jam.inference.loading", "GenerationSetupError"),
    ("megatron_jam.inference.retrieval_context", "RetrievalSetupError"),
)
# A missing or unreadable path, and a JSON input (model config, layout, prompts) that is not JSON.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
               json.JSONDecodeError)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    """The `--debug` flag every command has (read by `run_cli`)."""
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show its traceback instead of one line (also {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def require_path(flag: str, path: str, directory: bool = False) -> None:
    """A missing input named by its flag (`FileNotFoundError`, a user error), before anything slow starts."""
    ok = os.path.isdir(path) if directory else os.path.isfile(path)
    if not ok:
        raise FileNotFoundError(f"{flag} {path}: no such {'directory' if directory else 'file'}")


def user_error_types(extra: tuple[type, ...] = ()) -> tuple[type, ...]:
    """The exception types reported as one line: the project's (already imported), path errors, `extra`."""
    found = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return tuple(found) + PATH_ERRORS + tuple(extra)


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line (a message with line breaks is joined)."""
    return "error: " + " ".join(str(error).split("\n")).strip()


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
            extra_errors: tuple[type, ...] = ()) -> int:
    """Run a command's `main(argv)`; a user error becomes `error_line` on stderr (rank 0) and exit code 2.

    `extra_errors`: types that are user errors for this command only (e.g. `ValueError` where every
    ValueError the command can raise names a bad input)."""
    from megatron_jam.utils.logging import global_rank

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except Exception as e:
        if debug_requested(argv) or not isinstance(e, user_error_types(extra_errors)):
            raise
        if global_rank() == 0:
            sys.stderr.write(error_line(e) + "\n")
        return EXIT_USER_ERROR
    return 0 if code is None else code
