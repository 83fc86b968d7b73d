"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_ITEMS = 64  # prompts in one /v1/generate request
BASE_MODEL = "base"  # chat `model` meaning "no adapter"


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -----------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int = Field(description="The HTTP status code.")


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI shape."""

    error: ErrorBody


# ---- contexts ---------------------------------------------------------------------------------


class TextRequest(_Strict):
    text: NonEmptyText = Field(description="Text to absorb into (or forget from) the context.")


class ContextInfo(BaseModel):
    id: str = Field(description="Server-generated context id (32 hex digits).")
    version: int = Field(description="Grows by one with every change of the state.")
    created: float = Field(description="Unix seconds.")
    updated: float = Field(description="Unix seconds.")
    num_tokens: int = Field(description="Tokens the state holds: absorbed minus forgotten.")
    nbytes: int = Field(description="Tensor bytes of the state (constant for a generator).")
    generator_fingerprint: str
    base_model: str
    sha256: str = Field(description="Digest of the stored state: equal digests mean identical states.")
    compatible: bool = Field(description="Whether this server's generator and base model made the state.")


class ContextList(BaseModel):
    contexts: list[ContextInfo]


class Deleted(BaseModel):
    id: str
    deleted: bool = True


# ---- generation -------------------------------------------------------------------------------


class GenerateItem(_Strict):
    prompt: NonEmptyText
    context_id: str | None = Field(None, description="Adapter of this row; null for the base model.")


class GenerateRequest(_Strict):
    items: list[GenerateItem] = Field(min_length=1, max_length=MAX_ITEMS)
    max_new_tokens: int | None = Field(
        None, ge=1, description="At most the server's max_new_tokens; default: its default_new_tokens."
    )
    chat: bool = Field(True, description="Wrap each prompt in the model's chat template as a user message.")


class Answer(BaseModel):
    context_id: str | None
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class GenerateResponse(BaseModel):
    answers: list[Answer]


# ---- OpenAI chat completions ------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls, ...

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """OpenAI chat completion request. Decoding is greedy: sampling parameters are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description=f"A context id, or {BASE_MODEL!r} for the base model without adapter.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    n: int | None = Field(None, description="Only 1 is supported.")
    stream: bool | None = Field(None, description="Streaming is not supported.")
    temperature: float | None = None
    top_p: float | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


# ---- operations -------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    base_model: str
    generator_fingerprint: str


class Stats(BaseModel):
    queued: int
    batches: int
    rows: int
    max_batch_size: int
    batch_sizes: dict[str, int]
    cache: dict[str, int]
