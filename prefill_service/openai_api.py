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
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from kv_transfer.base import TokenEvent
from prefill_service.api_models import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, GenerateRequest
from prefill_service.service import PrefillService, PreparedRequest, ServiceError, collect

MAX_MESSAGES = 256


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    # Our extension: the task's input, formatted with the adapter's prompt template like /generate's "input".
    input: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_NEW_TOKENS)

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


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _to_generate(body: _Sampling, prompt: str | None, max_tokens: int | None,
                 task_input: str | None = None) -> GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        return GenerateRequest(task=body.model, prompt=prompt, input=task_input, max_new_tokens=max_tokens or 256,
                               temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                               stream=body.stream)
    except ValidationError as e:
        raise ServiceError(400, "; ".join(err["msg"] for err in e.errors())) from e


def _completion_prompt(body: CompletionRequest) -> str | None:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ServiceError(400, "prompt: exactly one prompt per request is supported")
        return body.prompt[0]
    return body.prompt


def build_router(get_service: Any) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        service: PrefillService = get_service(request)
        tasks = ["base", *service.adapters.tasks()]
        return {"object": "list", "data": [{"id": t, "object": "model", "created": 0, "owned_by": "prad"}
                                           for t in tasks]}

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        service: PrefillService = get_service(request)
        gen = _to_generate(body, _completion_prompt(body), body.max_tokens, body.input)
        return await _run(service, gen, "text_completion")

    @router.post("/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        service: PrefillService = get_service(request)
        messages = [m.model_dump() for m in body.messages]
        prompt = service.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        gen = _to_generate(body, prompt, body.max_completion_tokens or body.max_tokens)
        return await _run(service, gen, "chat.completion")

    return router


async def _run(service: PrefillService, gen: GenerateRequest, kind: str) -> JSONResponse | StreamingResponse:
    prepared = await run_in_threadpool(service.prepare, gen)
    events = service.submit(prepared)
    return await _respond(prepared, events, kind, stream=gen.stream)


async def _respond(req: PreparedRequest, events: AsyncIterator[TokenEvent], kind: str,
                   stream: bool) -> JSONResponse | StreamingResponse:
    if stream:
        return StreamingResponse(_stream(req, events, kind), media_type="text/event-stream")
    result = await collect(events)
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return JSONResponse({**_envelope(req, kind), "choices": [choice], "usage": _usage(req, len(result.token_ids))})


def _envelope(req: PreparedRequest, kind: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{req.request_id}", "object": kind, "created": int(time.time()), "model": req.task,
            "system_fingerprint": req.adapter_version}


def _usage(req: PreparedRequest, num_tokens: int) -> dict[str, int]:
    n = len(req.prompt_token_ids)
    return {"prompt_tokens": n, "completion_tokens": num_tokens, "total_tokens": n + num_tokens}


async def _stream(req: PreparedRequest, events: AsyncIterator[TokenEvent], kind: str) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    num_tokens = 0
    if chat:
        yield _chunk(req, obj, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    try:
        async for event in events:
            num_tokens += len(event.token_ids)
            if event.finish_reason == "error":
                yield f"data: {json.dumps({'error': {'message': event.error, 'code': event.error_status}})}\n\n"
                break
            if event.text:
                piece = {"content": event.text} if chat else None
                yield _chunk(req, obj, {"index": 0, **({"delta": piece} if chat else {"text": event.text}),
                                        "finish_reason": None})
            if event.is_final:
                last = {"index": 0, "finish_reason": event.finish_reason, **({"delta": {}} if chat else {"text": ""})}
                yield _chunk(req, obj, last, usage=_usage(req, num_tokens))
    except ServiceError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.status}})}\n\n"
    yield "data: [DONE]\n\n"


def _chunk(req: PreparedRequest, obj: str, choice: dict[str, Any], usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {**_envelope(req, obj), "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"
