"""Build and install ff_kernels (python/ff_kernels) and its Triton kernels (fftriton/).

Install with ``pip install --no-build-isolation -e .`` after installing torch, so pip never
resolves a torch build of its own.
"""

from setuptools import setup

setup(
    name="ff_kernels",
    version="0.1.0",
    description="Forward-Forward training with fused Triton kernels and a pure-torch reference",
    packages=[
        "ff_kernels", "ff_kernels.ops", "ff_kernels.nn", "ff_kernels.data", "ff_kernels.recipes", "fftriton",
    ],
    package_dir={"ff_kernels": "python/ff_kernels", "fftriton": "fftriton"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={"triton": ["triton>=3.0"], "plots": ["matplotlib"]},
    entry_points={"console_scripts": ["ff-train=ff_kernels.cli:main"]},
)
