import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffusionGemma checkpoint (canvas 16) with the bundled tokenizer."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))
