"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` names the task ("base" = no adapter). Requests are translated into the same GenerateRequest
that /generate takes, so results are identical; responses and errors use OpenAI's shapes.
/v1/completions also takes our `input` field instead of `prompt`: the task's input, formatted with its
adapter's prompt template exactly as /generate formats `input`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from kv_transfer.base import TokenEvent
from kv_transfer.outcome import ErrorKind, FinishReason
from prad.sampling import MAX_SEED, MAX_STOP_STRINGS
from prefill_service.api_models import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_TASK_CHARS,
    ONE_PROMPT,
    SSE,
    ChatCompletionResponse,
    CompletionResponse,
    GenerateRequest,
    ModelList,
    StopString,
    error_responses,
)
from prefill_service.deps import RouteHints, RouteHintsDep, ServiceDep
from prefill_service.engine import PrefillRequest
from prefill_service.http_errors import CLIENT_CLOSED_REQUEST, openai_stream_error
from prefill_service.service import (
    PrefillService,
    ServiceError,
    collect_unless,
    wait_disconnect,
)

MAX_MESSAGES = 256
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
MAX_USER_CHARS = 256

# OpenAI fields this server does not implement, with the values that ask for nothing (accepted, like
# absence); any other value is refused with a 400 naming the field rather than silently ignored.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "tools": ([],),
    "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
}
SERVING_ERRORS = (400, 401, 404, 408, 413, 429, 502, 503, 504)


def _unsupported(kind: str, **bounds: Any) -> Any:
    return Field(default=None, description=f"not supported: leave it out or send {kind}", **bounds)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """None, or one of the neutral values (numbers compare by value: JSON 0 is 0.0; booleans never do)."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        if isinstance(a, int | float) and isinstance(b, int | float):
            return a == b
        return type(a) is type(b) and a == b

    return value is None or any(same(value, n) for n in neutral)


class TextFormat(BaseModel):
    type: Literal["text"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="a last chunk with empty choices carries usage")


class _Sampling(BaseModel):
    # OpenAI clients send fields that change nothing here (metadata, store, ...): ignored. Fields that
    # would change the answer and are not implemented are declared below and refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_TASK_CHARS, description="the task id, or 'base'")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS, description="end-user id (accepted)")
    # The types below document the neutral values only; the validator refuses anything else by name.
    logprobs: Literal[False] | None = _unsupported("false")
    logit_bias: dict[str, float] | None = _unsupported("{}", max_length=0)
    presence_penalty: float | None = _unsupported("0", ge=0, le=0)
    frequency_penalty: float | None = _unsupported("0", ge=0, le=0)

    @field_validator(*NEUTRAL_VALUES, mode="before", check_fields=False)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> None:
        neutral = NEUTRAL_VALUES[info.field_name or ""]
        if _is_neutral(value, neutral):
            return None
        raise ValueError(f"not supported by this server; leave it out or send {json.dumps(neutral[0])}")


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=ONE_PROMPT)

    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] | None = Field(
        default=None, description="one prompt (a list of exactly one is accepted)")
    # Our extension: the task's input, formatted with the adapter's prompt template like /generate's "input".
    input: PromptText | None = None
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    echo: Literal[False] | None = _unsupported("false")
    best_of: Literal[1] | None = _unsupported("1")
    suffix: Literal[""] | None = _unsupported('""')

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of 'prompt' or 'input'")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    top_logprobs: Literal[0] | None = _unsupported("0")
    tools: list[dict[str, Any]] | None = _unsupported("[]", max_length=0)
    tool_choice: Literal["none", "auto"] | None = _unsupported('"none"')
    functions: list[dict[str, Any]] | None = _unsupported("[]", max_length=0)
    function_call: Literal["none", "auto"] | None = _unsupported('"none"')
    response_format: TextFormat | None = _unsupported('{"type": "text"}')


def _to_generate(body: _Sampling, prompt: str | None, max_tokens: int | None,
                 task_input: str | None = None) -> GenerateRequest:
    stop: list[str] = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        return GenerateRequest(task=body.model, prompt=prompt, input=task_input, max_new_tokens=max_tokens or 256,
                               temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                               stream=body.stream, user=body.user or None)
    except ValidationError as e:
        raise ServiceError(ErrorKind.INVALID, "; ".join(err["msg"] for err in e.errors())) from e


def _completion_prompt(body: CompletionRequest) -> str | None:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ServiceError(ErrorKind.INVALID, "prompt: exactly one prompt per request is supported")
        return body.prompt[0]
    return body.prompt


def build_router() -> APIRouter:
    """The /v1 routes. Their validation errors are OpenAI 400s (app.py): the OpenAPI document lists 400
    and no 422 for them."""
    router = APIRouter(prefix="/v1")

    @router.get("/models", response_model=ModelList, responses=error_responses(401, openai=True))
    async def models(service: ServiceDep) -> dict[str, Any]:
        tasks = ["base", *service.adapters.tasks()]
        return {"object": "list", "data": [{"id": t, "object": "model", "created": 0, "owned_by": "prad"}
                                           for t in tasks]}

    @router.post("/completions", response_model=None,
                 responses={200: {"model": CompletionResponse, "content": SSE},
                            **error_responses(*SERVING_ERRORS, openai=True)})
    async def completions(body: CompletionRequest, request: Request, service: ServiceDep,
                          hints: RouteHintsDep) -> Response:
        service.check_admission(body.model)
        gen = _to_generate(body, _completion_prompt(body), body.max_tokens, body.input)
        return await _run(service, gen, "text_completion", request, _include_usage(body), hints)

    @router.post("/chat/completions", response_model=None,
                 responses={200: {"model": ChatCompletionResponse, "content": SSE},
                            **error_responses(*SERVING_ERRORS, openai=True)})
    async def chat(body: ChatRequest, request: Request, service: ServiceDep, hints: RouteHintsDep) -> Response:
        service.check_admission(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt = cast(str, service.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=False))
        gen = _to_generate(body, prompt, body.max_completion_tokens or body.max_tokens)
        return await _run(service, gen, "chat.completion", request, _include_usage(body), hints)

    return router


def _include_usage(body: _Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _run(service: PrefillService, gen: GenerateRequest, kind: str, request: Request,
               include_usage: bool, hints: RouteHints) -> Response:
    prepared = await run_in_threadpool(service.prepare, gen, hints.routing_key, hints.may_pin)
    events = service.submit(prepared)
    if gen.stream:
        return StreamingResponse(_stream(prepared, events, kind, include_usage), media_type="text/event-stream")
    return await _respond(prepared, events, kind, request)


async def _respond(req: PrefillRequest, events: AsyncIterator[TokenEvent], kind: str, request: Request) -> Response:
    """The whole completion as one JSON body; a client that hangs up first aborts the request."""
    result = await collect_unless(events, wait_disconnect(request.receive))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return JSONResponse({**_envelope(req, kind), "choices": [choice], "usage": _usage(req, len(result.token_ids))})


def _envelope(req: PrefillRequest, kind: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{req.request_id}", "object": kind, "created": int(time.time()), "model": req.task,
            "system_fingerprint": req.adapter_version}


def _usage(req: PrefillRequest, num_tokens: int) -> dict[str, int]:
    n = len(req.prompt_token_ids)
    return {"prompt_tokens": n, "completion_tokens": num_tokens, "total_tokens": n + num_tokens}


async def _stream(req: PrefillRequest, events: AsyncIterator[TokenEvent], kind: str,
                  include_usage: bool = False) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    num_tokens = 0
    if chat:
        yield _chunk(req, obj, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    try:
        async for event in events:
            num_tokens += len(event.token_ids)
            if event.finish_reason is FinishReason.ERROR:
                yield f"data: {json.dumps(openai_stream_error(event.error_kind, event.error or 'request failed'))}\n\n"
                break
            if event.text:
                piece = {"content": event.text} if chat else None
                yield _chunk(req, obj, {"index": 0, **({"delta": piece} if chat else {"text": event.text}),
                                        "finish_reason": None})
            if event.is_final:
                last: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason,
                                        **({"delta": {}} if chat else {"text": ""})}
                yield _chunk(req, obj, last, usage=_usage(req, num_tokens))
                if include_usage:
                    yield _chunk(req, obj, None, usage=_usage(req, num_tokens))
    except ServiceError as e:
        yield f"data: {json.dumps(openai_stream_error(e.kind, e.message))}\n\n"
    yield "data: [DONE]\n\n"


def _chunk(req: PrefillRequest, obj: str, choice: dict[str, Any] | None,
           usage: dict[str, int] | None = None) -> str:
    """One SSE event; choice None gives OpenAI's usage-only chunk (`choices: []`)."""
    body: dict[str, Any] = {**_envelope(req, obj), "choices": [] if choice is None else [choice]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"
