"""The seam between the API front ends (HTTP, gRPC) and whatever generates tokens.

Front ends tokenize, validate and format; a `Pipeline` turns token ids into a stream of
`RequestOutput`s. `ColocatedPipeline` runs one engine in this process (`--mode
colocated`, and the API tests); the disaggregated pipeline routes each request through a
prefill pool and a decode pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    deadline_s: float | None = None  # seconds from now the client is willing to wait
    trace_context: dict[str, str] = field(default_factory=dict)
    operation: str = "text_completion"  # gen_ai.operation.name: the API's, e.g. "chat"


class Pipeline(ABC):
    """Generates for validated requests; raises ValueError for input the model cannot take
    (context window exceeded, token ids out of range) before streaming anything."""

    model_id: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int  # token ids a prompt may hold: [0, vocab_size)

    @property
    def max_choices(self) -> int | None:
        """Choices it runs at once (each prompt x n of a request counts one); None: no
        bound. A request of more could never be admitted whole."""
        return None

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, in order; the last has `finished` set."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether a request sent now can be served."""


class ColocatedPipeline(Pipeline):
    """One engine doing prefill and decode in this process."""

    def __init__(self, engine: AsyncEngine, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.scheduler.max_model_len
        self.vocab_size = engine.engine.config.model.vocab_size

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(
            request.prompt_token_ids,
            request.params,
            request.request_id,
            cache_salt=request.cache_salt,
        ):
            yield out

    def ready(self) -> bool:
        return True
