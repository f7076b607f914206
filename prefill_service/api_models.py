"""Request and response bodies of the HTTP API (validated by pydantic: bad input -> 422), and the
error bodies the OpenAPI document lists for every status a route can answer.

Every field has a bound that the KV handoff's protobuf fields (kv_transfer/protos/kv_handoff.proto:
uint32 max_new_tokens and top_k, uint64 seed, double temperature and top_p) can carry, so whether
a request is accepted never depends on the transport that carries it to decode.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from adapters_store.routing import MAX_ROUTING_KEY_CHARS
from prad.sampling import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS

MAX_PROMPT_CHARS = 200_000
MAX_NEW_TOKENS = 4096
MAX_TOP_K = 1 << 20  # above any vocabulary (a larger k cuts nothing), well inside the proto's uint32
MAX_TASK_CHARS = 64

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


# JSON Schema for "exactly one of prompt / input" (checked by the models' validators).
ONE_PROMPT: JsonDict = {"oneOf": [{"required": ["prompt"], "properties": {"prompt": {"not": {"type": "null"}}}},
                        {"required": ["input"], "properties": {"input": {"not": {"type": "null"}}}}]}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=ONE_PROMPT)

    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS, description="task id, or 'base' for no adapter")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="raw prompt text")
    input: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                              description="the task's input, formatted with the adapter's prompt template")
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="0 = no top-k cut")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    ignore_eos: bool = False
    user: str | None = Field(default=None, min_length=1, max_length=MAX_ROUTING_KEY_CHARS,
                             description="routing key: the same user always gets the same adapter version of "
                                         "a task's traffic split (or send the X-PrAd-Routing-Key header)")
    adapter_version: str | None = Field(default=None, pattern="^[0-9a-f]{16}$",
                                        description="pin this adapter version of the task (only where the "
                                                    "server allows pinning, or with X-PrAd-Admin-Token)")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of 'prompt' or 'input'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    request_id: str
    task: str
    adapter_version: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


class TaskInfo(BaseModel):
    """One row of GET /tasks; `error` says why a listed task cannot be served."""

    task: str
    adapter_version: str | None = None
    variant: str | None = None
    rank: int | None = None
    error: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskInfo]


# --- OpenAI response bodies (documentation: openai_api.py builds them as dicts) ------------------------

class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class AssistantMessage(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str  # the adapter version that served the request
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ChatCompletionResponse(CompletionResponse):
    choices: list[ChatChoice]  # type: ignore[assignment]


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


# --- error bodies (documentation: the handlers in app.py and openai_api.py build them) ----------------

class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Error body of the native routes: a message, or the validation issues (422)."""

    detail: str | list[ValidationIssue]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(BaseModel):
    """Error body of /v1/*, in OpenAI's shape."""

    error: OpenAIErrorBody


ERROR_DESCRIPTIONS = {
    400: "invalid request", 401: "missing or invalid credentials",
    403: "wrong admin token, or not allowed (pinning a version)", 404: "unknown task or version",
    408: "request body not received in time", 409: "conflicting change",
    413: "request body or prompt too large", 422: "request failed validation", 429: "queue full: retry later",
    502: "decode refused the KV handoff", 503: "service or task unavailable", 504: "request timed out",
}

# One server-sent event per output chunk; `data` holds the chunk as JSON (then `[DONE]` on /v1).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route: each status with its error body model."""
    model = OpenAIError if openai else ErrorResponse
    return {status: {"model": model, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}
