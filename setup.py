"""Install the LongCat-Video acceleration toolkit as the single package ``longcat``.

The repository keeps ``kernels/``, ``quant/`` and ``bench/`` at the top level, but they are
installed as ``longcat.kernels``, ``longcat.quant`` and ``longcat.bench``: a top-level ``kernels``
module would shadow the unrelated PyPI package of that name.
"""
from setuptools import setup

SUBPACKAGE_DIRS = {
    "longcat": "longcat",
    "longcat.kernels": "kernels",
    "longcat.kernels.attention": "kernels/attention",
    "longcat.quant": "quant",
    "longcat.bench": "bench",
}

setup(
    name="longcat-accel",
    version="0.1.0",
    description="Triton kernels, 8-bit quantization and a benchmark harness for the LongCat-Video DiT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=list(SUBPACKAGE_DIRS),
    package_dir=SUBPACKAGE_DIRS,
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "safetensors>=0.4",
        "numpy",  # safetensors.torch.save_file needs it
        "nvidia-ml-py>=12.0",
    ],
    extras_require={
        "test": ["pytest>=7.0", "pytest-benchmark>=4.0", "hypothesis>=6.0"],
        "peers": ["bitsandbytes>=0.43", "optimum-quanto>=0.2"],
        # longcat-bench pipeline: the UMT5 text encoder and the Wan VAE at real size (random weights)
        "pipeline": ["transformers>=4.45", "diffusers>=0.33"],
    },
    entry_points={"console_scripts": ["longcat-bench=longcat.bench.cli:main"]},
)
