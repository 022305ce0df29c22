"""Parallel set-up around Megatron-Core: building model chunks, running its schedules, full state dicts."""
