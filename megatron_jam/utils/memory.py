"""Process memory settings for tools that stream large tensors (the checkpoint converter)."""

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of at least `threshold` bytes with mmap, so that freeing them returns the pages.

    Why: glibc raises its mmap threshold after the first large free (up to 32 MiB on 64-bit), after
    which tensors below that size come from the heap and can stay resident once freed; a converter
    that frees every part would keep the high-water mark of each size class. Setting the threshold
    fixes it. Returns False (and changes nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
