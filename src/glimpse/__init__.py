"""Glimpse: serve hybrid Mamba-Transformer vision-language models (Nemotron Nano 2 VL)."""

from glimpse.outputs import CompletionOutput, Logprob, RequestOutput
from glimpse.sampling_params import SamplingParams
from glimpse.version import __version__

__all__ = ["__version__", "LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    # The engine pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from glimpse.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from glimpse.engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
