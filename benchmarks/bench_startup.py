#!/usr/bin/env python
"""Start-up time of every command: `--help` of each tool and of the trainer, and `import megatron_jam`.

Why: `--help` is the first thing a new user runs, and a tool that imports torch and Megatron-Core before
parsing its flags makes every typo cost seconds. Each command runs `--repeat` times in a fresh interpreter;
the table gives the best and the median wall time, and whether torch / Megatron-Core were imported by the
`--help` run (`-X importtime` is not needed: the child reports sys.modules). Asserts nothing; the budget is
under 1 s per `--help` (issue 16). Example:
    python benchmarks/bench_startup.py --repeat 3
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the command's own entry point as `python tool.py --help` would, then reports the heavy imports.
PROBE = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    {run}
except SystemExit:
    pass
print("IMPORTED", "torch" in sys.modules, "megatron.core" in sys.modules, file=sys.stderr)
"""


def commands() -> list[tuple[str, str]]:
    """(name, python statement) for `import megatron_jam`, the trainer and every tool."""
    out = [("import megatron_jam", "import megatron_jam"),
           ("python -m megatron_jam.pretrain", "runpy.run_module('megatron_jam.pretrain', run_name='__main__')"),
           ("python -m megatron_jam.training.plot",
            "runpy.run_module('megatron_jam.training.plot', run_name='__main__')")]
    for path in sorted(glob.glob(os.path.join(REPO, "tools", "*.py"))):
        out.append((f"tools/{os.path.basename(path)}", f"runpy.run_path({path!r}, run_name='__main__')"))
    return out


def time_once(statement: str, script: str) -> tuple[float, str]:
    code = PROBE.format(script=script, run=statement)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tools")]))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    line = next((x for x in out.stderr.splitlines() if x.startswith("IMPORTED")), "IMPORTED ? ?")
    torch, mcore = line.split()[1:3]
    return wall, f"{'torch' if torch == 'True' else '-':5s} {'mcore' if mcore == 'True' else '-':5s}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="fresh interpreters per command")
    args = p.parse_args(argv)
    print(f"{'command (--help)':42s} {'best s':>7s} {'median s':>9s}  imports")
    for name, statement in commands():
        runs = [time_once(statement, name) for _ in range(args.repeat)]
        walls = [w for w, _ in runs]
        print(f"{name:42s} {min(walls):7.2f} {statistics.median(walls):9.2f}  {runs[-1][1]}")


if __name__ == "__main__":
    main()
