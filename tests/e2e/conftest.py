import pytest

from adaptserve.model.loaders import load_checkpoint


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once (weights dequantized to float32 + tokenizer)."""
    return load_checkpoint(None, progress=False)
