from __future__ import annotations

from pathlib import Path

import pytest

from continuum_tiered.core.tiny_model import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
