"""Placeholder replaced by the CPU compatibility layer (work in progress in this session)."""


def install() -> None:
    return None
