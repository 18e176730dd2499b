import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REFERENCE_DIR.is_dir():  # the project sits at <root>/main with shared/ beside it; CI clones elsewhere
    REFERENCE_DIR = Path(os.environ.get("EBT_REFERENCE_DIR", Path.cwd().parent / "shared" / "reference"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference tensors not found at {REFERENCE_DIR}: set EBT_REFERENCE_DIR")
    return REFERENCE_DIR
