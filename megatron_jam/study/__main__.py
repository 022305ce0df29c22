"""`python -m megatron_jam.study [--quick] [flags]`: run the whole study, then write the report.

Exit codes: 0 done (``<output>/report.md``), 1 a tool failed (its log is named), 2 bad flags.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_jam.study.config import parse
    from megatron_jam.study.jobs import StudyError, logger
    from megatron_jam.study.pipeline import Study
    from megatron_jam.study.report import write_report
    from megatron_jam.study.summary import write_machine, write_summary

    argv = sys.argv[1:] if argv is None else argv
    command = os.environ.get("JAM_STUDY_COMMAND", "").strip() \
        or shlex.join(["python", "-m", "megatron_jam.study", *argv])
    cfg = parse(argv, sys.executable, command)
    if cfg.resume:  # the report names the command that started the study (the wall-time line says it resumed)
        cfg.command = _earlier_run(cfg.output, "study_config.json").get("command") or command
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(cfg.output, "work")) and not cfg.resume:
        logger.error("--output %s already holds a study: --resume continues it; or remove it", cfg.output)
        return 2
    study = Study(cfg, repo)
    start, earlier = time.time(), _earlier_run(study.out, "machine.json") if cfg.resume else {}
    write_machine(study.out, cfg, start, None, earlier)
    try:
        study.run()
    except StudyError as e:
        write_machine(study.out, cfg, start, time.time(), earlier)  # its wall time counts if it is resumed
        logger.error("%s", e)
        return 1
    write_machine(study.out, cfg, start, time.time(), earlier)
    write_summary(study.out)
    report = write_report(study.out)
    logger.info("report: %s (%.0f s)", report, time.time() - start)
    return 0


def _earlier_run(out: str, name: str) -> dict:
    """A JSON file of the stopped study being resumed (machine.json: its start and wall time so far)."""
    import json

    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
