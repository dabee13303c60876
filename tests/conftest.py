import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The tests import train/ and bench/ from the checkout. Its root goes behind site-packages: its
# `kernels/` and `daemon/` folders share their names with installed packages (transformers imports
# `kernels`), and dgemma itself comes from the install.
sys.path.append(str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffusionGemma checkpoint (canvas 16) with the bundled tokenizer."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))
