"""Request and response bodies of the HTTP API (validated by pydantic: bad input -> 422)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prad.sampling import MAX_SEED, MAX_STOP_STRINGS

MAX_PROMPT_CHARS = 200_000
MAX_NEW_TOKENS = 4096


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=64, description="task id, or 'base' for no adapter")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="raw prompt text")
    input: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                              description="the task's input, formatted with the adapter's prompt template")
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of 'prompt' or 'input'")
        if any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop strings must be 1-256 characters")
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
