import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are small: intra-op threads add nothing, and on a shared 2-core machine spinning
    OpenMP threads slow the tests several-fold. Multi-process tests set OMP_NUM_THREADS=1 too."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """What the training-job tests run on (tests/_trained.py: tiny encoder, 16 shards of 4), built
    once per session and only read. A module with other assets defines its own fixture."""
    from tests._trained import assets as train_assets
    return train_assets(tmp_path_factory)
