import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test draws fresh random data, reproducibly: the seed is derived from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _restore_float32_matmul_settings():
    """Process-wide float32 matmul settings as they were before the test: transformers' ``TrainingArguments`` with
    ``torch_compile=True`` turns TF32 on for the whole process (on a GPU), which would make every later float32
    comparison on CUDA run in TF32."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    precision, matmul_tf32, cudnn_tf32 = saved
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests are skipped unless the ``-m`` expression names ``slow``: ``python3 -m pytest -q`` (the
    README's and CI's command) runs all but them (docs/testing.md)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow (inductor compiles C++ on the CPU, about a minute): run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
