"""Build megatron-jam and its C++ extension (`megatron_jam._C`, sources in csrc/).

torch is deliberately not pinned in `install_requires`, only bounded by the versions it was checked on: GPU
clusters bring their own CUDA build, and `scripts/install.sh` pins the CPU
build (2.13.0) only where no GPU is present.
"""

import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megatron_jam._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="megatron-jam",
    version="0.1.0",
    description="JAM: jointly trained autoregressive multimodal models on Megatron-Core",
    packages=find_packages(include=["megatron_jam", "megatron_jam.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.14",  # checked from 2.11 (GPU machine) to 2.13 (CPU); a newer minor: rerun the tests
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "pybind11",
        "psutil",
        "safetensors",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=4.45", "faiss-cpu", "ruff==0.17.6", "lm-eval==0.4.13"],
        "retrieval": ["faiss-cpu", "transformers>=4.45"],
        # zero-shot benchmarks (docs/evaluation.md); pulls datasets, pandas, pyarrow, scipy, scikit-learn (~600 MB)
        "eval": ["lm-eval==0.4.13"],
        "hf": ["transformers>=4.45"],
        # CUDA only; NGC PyTorch images already carry both.
        "te": ["transformer-engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
