"""A client's request as the pipeline takes it: prompt token ids and one `SamplingParams`
per choice.

Both front ends come through here: HTTP once pydantic has parsed the JSON, gRPC once its
message is mapped onto the same pydantic models. So a request is checked in one place,
whichever protocol carried it.

`model` may be left out: it means the one model this server serves (as vLLM allows);
any other name is a 404, so a client aimed at the wrong server finds out at once.

The prefix-cache salt is the tenant's (the API key's digest, see api_keys.py) with the
client's own `cache_salt` inside it: a client can split its own cache further, never
reach into another tenant's. Without keys the client's salt alone is used.

Choices are numbered prompt-major, as vLLM numbers them: choice `i` answers prompt
`i // n`. With a seed, choice `i` of a prompt samples with `seed + i`, so the same request
with the same seed gives the same texts, and the n choices still differ from each other.

`truncate_prompt_tokens` keeps a prompt's last k tokens, as vLLM keeps them: a token-id
prompt's, a text prompt's as transformers truncates while tokenizing (a BOS the tokenizer
adds stays, and counts), the templated conversation's for chat. -1 keeps what the context
window leaves beside the requested output tokens; asking for more than that is an error.

Planning tokenizes, and a prompt of megabytes takes seconds: the front ends plan in a
worker thread (`asyncio.to_thread`), never on the event loop that serves other streams.

Ids follow vLLM's: a request answers as `cmpl-<id>` / `chatcmpl-<id>`, its id the
client's own (`request_id`, which the HTTP front end sets from X-Request-Id) or a fresh
one. A client's id is echoed, never trusted to be unique: the engine runs each choice
under an id with a random part (`run_id`), so two requests under one id never meet there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from services.router.errors import InvalidRequestError, ModelNotFoundError, NotReadyError
from services.router.openai_protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)
from services.router.pipeline import GenerationRequest, Pipeline

MAX_CHOICES = MAX_N  # prompts x n, per request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for completions
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class RequestPlan:
    request_id: str  # what the client sees: its own id, or "cmpl-…" / "chatcmpl-…"
    model: str
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]  # one per choice, len(prompts) * n
    cache_salt: bytes = b""
    run_id: str = ""  # unique; choice i runs as f"{run_id}-{i}" (default: request_id)
    include_stop_str_in_output: bool = False  # the router adds it: the engine cuts it off
    operation: str = "text_completion"  # gen_ai.operation.name of the API called
    return_tokens_as_token_ids: bool = False  # logprobs name tokens `token_id:<id>`
    return_token_ids: bool = False  # answers carry prompt and output token ids

    def __post_init__(self) -> None:
        assert len(self.params) == len(self.prompts) * self.n
        if not self.run_id:
            object.__setattr__(self, "run_id", self.request_id)

    @property
    def num_choices(self) -> int:
        return len(self.params)

    def prompt_of(self, choice: int) -> int:
        return choice // self.n

    def generation_requests(self) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                f"{self.run_id}-{i}",
                self.prompts[self.prompt_of(i)],
                params,
                cache_salt=self.cache_salt,
                operation=self.operation,
            )
            for i, params in enumerate(self.params)
        ]


def serving_pipeline(get_pipeline: Callable[[], Pipeline]) -> Pipeline:
    """The pipeline, if it can take a request now; `get_pipeline` may raise NotReadyError."""
    pipeline = get_pipeline()
    if not pipeline.ready():
        raise NotReadyError("the server is not taking requests now (starting or draining); retry")
    return pipeline


def plan_completion(
    request: CompletionRequest,
    pipeline: Pipeline,
    request_id: str | None = None,
    tenant: str = "",
) -> RequestPlan:
    """The plan of a completions request. `request_id`: the id to answer under, as it is
    (gRPC's own); without it, vLLM's (see the module's docstring)."""
    model = _served_model(request, pipeline)
    max_tokens = request.max_output_tokens or DEFAULT_COMPLETION_TOKENS
    keep = _prompt_tokens_kept(request, pipeline.max_model_len, max_tokens, request.output_param)
    prompts = [_completion_prompt(p, pipeline.tokenizer, keep) for p in request.prompts]
    _check_token_ids(prompts, request, pipeline.vocab_size)
    params = _choice_params(request, len(prompts), max_tokens, request.logprobs, pipeline)
    _check_fits(prompts, params[0], pipeline.max_model_len, request.output_param)
    salt = _salt(request, tenant)
    shown, run = _ids(request_id, request.request_id, "cmpl")
    return RequestPlan(
        shown,
        model,
        prompts,
        request.n,
        params,
        salt,
        run,
        request.include_stop_str_in_output,
        return_tokens_as_token_ids=bool(request.return_tokens_as_token_ids),
        return_token_ids=request.return_token_ids,
    )


def plan_chat(
    request: ChatCompletionRequest,
    pipeline: Pipeline,
    request_id: str | None = None,
    tenant: str = "",
) -> RequestPlan:
    """The plan of a chat request; `request_id` as for `plan_completion`."""
    model = _served_model(request, pipeline)
    messages = [m.template_message() for m in request.messages]
    try:
        prompt = pipeline.tokenizer.encode_chat(
            messages, request.add_generation_prompt, request.continue_final_message
        )
    except ValueError as e:  # no chat template, or the template rejected the conversation
        raise InvalidRequestError(str(e), param="messages") from e
    requested = request.max_output_tokens or 0  # vLLM's: nothing asked, nothing set aside
    keep = _prompt_tokens_kept(request, pipeline.max_model_len, requested, request.output_param)
    prompt = _last(prompt, keep)
    # Chat's default is the rest of the context window.
    room = pipeline.max_model_len - len(prompt)
    if request.max_output_tokens is None and room < 1:
        raise InvalidRequestError(
            f"the conversation is {len(prompt)} tokens, which leaves no room for a reply in "
            f"this model's context window of {pipeline.max_model_len} tokens; shorten the "
            "messages",
            param="messages",
        )
    max_tokens = request.max_output_tokens or room
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    _check_token_ids([prompt], request, pipeline.vocab_size)
    params = _choice_params(request, 1, max_tokens, logprobs, pipeline)
    _check_fits([prompt], params[0], pipeline.max_model_len, request.output_param)
    shown, run = _ids(request_id, request.request_id, "chatcmpl")
    salt = _salt(request, tenant)
    return RequestPlan(
        shown,
        model,
        [prompt],
        request.n,
        params,
        salt,
        run,
        request.include_stop_str_in_output,
        operation="chat",
        return_tokens_as_token_ids=bool(request.return_tokens_as_token_ids),
        return_token_ids=request.return_token_ids,
    )


def _prompt_tokens_kept(
    request: SamplingRequest, max_model_len: int, max_output: int, output_param: str
) -> int | None:
    """How many of a prompt's last tokens `truncate_prompt_tokens` keeps; None: all."""
    keep = request.truncate_prompt_tokens
    if keep is None:
        return None
    room = max_model_len - max_output  # vLLM's bound: the prompt and the output must fit
    if keep == -1:
        keep = room
    if not 1 <= keep <= room:
        raise InvalidRequestError(
            f"truncate_prompt_tokens: {request.truncate_prompt_tokens} asks for more prompt "
            f"tokens than the context window leaves: max_model_len {max_model_len} - "
            f"{output_param} {max_output} = {room}",
            param="truncate_prompt_tokens",
        )
    return keep


def _completion_prompt(
    prompt: str | list[int], tokenizer: Tokenizer, keep: int | None
) -> list[int]:
    if isinstance(prompt, list):
        return _last(prompt, keep)
    ids = tokenizer.encode(prompt)
    if keep is None or not tokenizer.add_bos_token:
        return _last(ids, keep)
    # transformers truncates the text's own tokens, then adds BOS: it stays, and counts.
    return [ids[0], *_last(ids[1:], keep - 1)]


def _last(ids: list[int], keep: int | None) -> list[int]:
    return ids if keep is None else ids[max(len(ids) - keep, 0) :]


def _salt(request: SamplingRequest, tenant: str) -> bytes:
    own = (request.cache_salt or "").encode()
    # Every request of a keyed router has a tenant, so a bare client salt never meets one.
    return f"tenant:{tenant}\0".encode() + own if tenant else own


def _served_model(request: SamplingRequest, pipeline: Pipeline) -> str:
    """The served model's id; a request naming none ("" as vLLM reads it, or no field)
    gets it."""
    if request.model:
        served_model(request.model, pipeline)
    return pipeline.model_id


def served_model(model: str, pipeline: Pipeline) -> None:
    """ModelNotFoundError unless `model` is the served model's id. An unknown name is
    echoed cut short: it lands in a gRPC status message, whose metadata limit would
    otherwise turn NOT_FOUND into RESOURCE_EXHAUSTED."""
    if model != pipeline.model_id:
        name = model if len(model) <= 80 else model[:80] + "..."
        raise ModelNotFoundError(
            f"the model {name!r} does not exist here; this server serves {pipeline.model_id!r}",
            param="model",
        )


def _choice_params(
    request: SamplingRequest,
    num_prompts: int,
    max_tokens: int,
    logprobs: int | None,
    pipeline: Pipeline,
) -> list[SamplingParams]:
    choices = num_prompts * request.n
    if choices > MAX_CHOICES:
        raise InvalidRequestError(
            f"n: {num_prompts} prompts x n={request.n} is {choices} choices; "
            f"at most {MAX_CHOICES} per request",
            param="n",
        )
    if pipeline.max_choices is not None and choices > pipeline.max_choices:
        # Never admitted whole, however idle the server: refused, not 429 for ever.
        raise InvalidRequestError(
            f"n: {num_prompts} prompts x n={request.n} is {choices} choices; this server runs "
            f"at most {pipeline.max_choices} at a time",
            param="n",
        )
    if request.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens: {request.min_tokens} exceeds max_tokens ({max_tokens})",
            param="min_tokens",
        )
    try:
        return [
            SamplingParams(
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=max(request.top_k or 0, 0),
                seed=None if request.seed is None else (request.seed + i) % SEED_LIMIT,
                stop=request.stop_strings,
                stop_token_ids=tuple(request.stop_token_ids or ()),
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
            )
            for _ in range(num_prompts)
            for i in range(request.n)
        ]
    except ValueError as e:  # a limit of the engine's that the request models do not state
        raise InvalidRequestError(str(e)) from e


def _check_fits(
    prompts: list[list[int]], params: SamplingParams, max_model_len: int, output_param: str
) -> None:
    """Each prompt and its output fit the context window (the pipeline checks again, as
    the engine does: here the error names the field)."""
    for prompt in prompts:
        try:
            params.check_fits(len(prompt), max_model_len, output_param)
        except ValueError as e:
            raise InvalidRequestError(str(e), param=output_param) from e


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _ids(exact: str | None, client_id: str | None, prefix: str) -> tuple[str, str]:
    """(the id the client sees, the unique id its choices run under). A client's id is
    echoed, never trusted to be unique: two requests under one id would share engine
    request ids, and one's cleanup would free the other's blocks. A client's run id ends
    in "." and 12 random hex digits, which a generated one (no ".") never does, so no
    client id can name another request's run."""
    if exact is None and client_id is not None:
        exact = f"{prefix}-{client_id}"
    if exact is None:
        own = _new_id(prefix)
        return own, own
    return exact, f"{exact}.{uuid.uuid4().hex[:12]}"


def _check_token_ids(prompts: list[list[int]], request: SamplingRequest, vocab: int) -> None:
    """Refused here, with the field named, rather than by the engine behind a pool."""
    for j, prompt in enumerate(prompts):
        which = "prompt" if len(prompts) == 1 else f"prompt {j}"
        if not prompt:
            message = f"{which} is empty: it must hold at least one token"
            raise InvalidRequestError(message, param="prompt")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise InvalidRequestError(
                f"{which}: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt"
            )
    for t in request.stop_token_ids or ():
        if not 0 <= t < vocab:
            raise InvalidRequestError(
                f"stop_token_ids: token id {t} is outside the vocabulary [0, {vocab})",
                param="stop_token_ids",
            )
