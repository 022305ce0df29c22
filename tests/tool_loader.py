"""Load a script of `tools/` as a module (the tools are scripts, not a package), once per call."""

import importlib.util
import os

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def load_tool(name: str):
    """`tools/<name>.py` as a fresh module (its `main(argv)` runs the CLI in-process)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(TOOLS, f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool
