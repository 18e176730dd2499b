import os
from pathlib import Path

import pytest
import torch

# the official code's outputs ship with the repository (tests/data/official/README.md); EBT_REFERENCE_DIR
# points the suite at other cases of the same format
REFERENCE_DIR = Path(os.environ.get("EBT_REFERENCE_DIR", Path(__file__).resolve().parent / "data" / "official"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference tensors not found at {REFERENCE_DIR}: unset EBT_REFERENCE_DIR or point it at a "
                    f"folder of official_*.safetensors files")
    return REFERENCE_DIR
