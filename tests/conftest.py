import os
import tempfile

import pytest
import torch

# The CI and dev machines have 2 cores; more threads only contend.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# diffusers copies the code of pipelines loaded with trust_remote_code here (read when diffusers is imported).
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="echodiff-test-hf-modules-"))


@pytest.fixture
def seed_all():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each training test picks its own settings."""
    from pipelines.utils import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
