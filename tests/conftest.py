"""Test-suite setup: Triton kernels run in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any test
module imports longcat.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_DIR = os.environ.get(
    "LONGCAT_GOLDEN_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"),
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A seeded CPU generator: every test draws its own reproducible random data."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def golden_dir():
    for candidate in (GOLDEN_DIR, os.path.join(os.path.dirname(__file__), "..", "shared", "golden")):
        if os.path.isfile(os.path.join(candidate, "tiny.json")):
            return os.path.abspath(candidate)
    pytest.fail(
        "golden files not found: set LONGCAT_GOLDEN_DIR to the folder holding tiny.json, "
        "tiny_weights.safetensors, tiny_io.safetensors and bsa_golden.safetensors"
    )
