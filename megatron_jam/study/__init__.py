"""The JAM paper's ablations (Tables 2-5) rerun at small scale on the picture world, with a report.

``python -m megatron_jam.study [--quick] [--seeds S ...] [--output DIR]`` (or
``examples/study/run_study.sh``; docs/study.md holds the latest default-size report).

Why a package of its own: the study is an orchestration of the project's real command-line tools (world, VQ tokenizer,
preprocessing, trainer, converter, evaluation, prompt following), each run as a
subprocess exactly as a user would run it; nothing here re-implements a tool.

- :mod:`.config`: the flags and the two sizes (``--quick`` and the default).
- :mod:`.jobs`: subprocesses with a log file each, wall times, a small pool.
- :mod:`.instruct_world`: the world's instruction set (how-to questions, answers with pictures).
- :mod:`.pipeline`: world -> VQ -> shards -> parents -> every variant -> instruction tuning.
- :mod:`.summary`: every measured number, read from the run's own JSON files, into ``summary.json``.
- :mod:`.paper`: the paper's own numbers (Tables 2-5), the only ones no run measured.
- :mod:`.report`, :mod:`.plots`: ``report.md`` and its PNG plots, from ``summary.json`` and the paper's numbers.
"""
