"""megatron-jam: the JAM framework (JAM-Uniform, JAM-Width, JAM-Cross) on Megatron-Core.

Importing the package installs the CPU compatibility layer for Megatron-Core
(a no-op when CUDA is available); see :mod:`megatron_jam.platform`.
"""

__version__ = "0.1.0"

from megatron_jam import platform as _platform  # noqa: E402

_platform.install()
