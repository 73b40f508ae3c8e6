"""Build and install ff_kernels (python/ff_kernels), its Triton kernels (fftriton/) and its compiled ops.

Install with ``pip install --no-build-isolation -e .`` after installing torch, so pip never
resolves a torch build of its own and the extension is compiled against the installed torch.

The extension ``ff_kernels._C`` (csrc/) registers ``torch.ops.ff_kernels.*``: CPU kernels
(OpenMP) always, CUDA kernels as well when torch is a CUDA build and nvcc is found
(CUDA_HOME or PATH). ``FF_KERNELS_NO_EXT=1`` skips the extension; ff_kernels then falls back
to its pure-torch code. ``CFLAGS=-g0`` roughly halves the compile time; ``MAX_JOBS`` caps ninja.
"""

import os
import warnings

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/bindings.cpp", "csrc/bindings_recipe_ops.cpp", "csrc/ff_epilogue_cpu.cpp", "csrc/gather_cpu.cpp", "csrc/head_cpu.cpp", "csrc/hybrid_cpu.cpp", "csrc/local2d_cpu.cpp", "csrc/local2d_cpu_rows.cpp", "csrc/sgd_cpu.cpp", "csrc/label_preacts_cpu.cpp"]
CUDA_SOURCES = ["csrc/local2d_cuda.cu"]


def extension_build() -> dict:
    """setup() arguments for the compiled ops: ext_modules and the ninja build_ext, or nothing."""
    if os.environ.get("FF_KERNELS_NO_EXT") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn(
            "torch is not importable at build time, so ff_kernels is built without its compiled ops; "
            "install torch first and use `pip install --no-build-isolation`"
        )
        return {}
    cxx = ["-O3", "-fopenmp"]  # no -march: the kernels pick AVX-512 / AVX2 paths at run time
    link = ["-fopenmp"]
    cuda_home = cpp_extension.CUDA_HOME
    if torch.version.cuda is not None and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        ext = cpp_extension.CUDAExtension(
            "ff_kernels._C", CPU_SOURCES + CUDA_SOURCES, define_macros=[("FF_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ff_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    # Metadata, dependencies and entry points: pyproject.toml. Here: where the packages are, and the extension.
    packages=find_packages("python") + ["fftriton"],
    package_dir={"ff_kernels": "python/ff_kernels", "fftriton": "fftriton"},
    **extension_build(),
)
