"""adaptserve: an LLM inference engine and OpenAI-compatible server that tunes itself while it runs."""

from adaptserve.engine.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and loaders; importing it lazily keeps `import adaptserve.engine` light
    if name == "LLM":
        from adaptserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'adaptserve' has no attribute {name!r}")
