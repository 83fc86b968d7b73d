"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str = Field(description="A stable machine-readable reason, e.g. context_length_exceeded.")


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI shape."""

    error: ErrorBody


# ---- contexts ---------------------------------------------------------------------------------


class TextRequest(_Strict):
    text: NonEmptyText = Field(description="Text to absorb into the context; it becomes an item of its ledger.")


class ForgetRequest(_Strict):
    """One item of the context's ledger: by its id, or by its exact text (then the newest item with that text)."""

    item: str | None = Field(None, description="Id of a ledger item of this context.")
    text: NonEmptyText | None = Field(None, description="The exact text of a ledger item of this context.")

    @model_validator(mode="after")
    def _one(self) -> ForgetRequest:
        if (self.item is None) == (self.text is None):
            raise ValueError("give exactly one of item and text")
        return self


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


class Absorbed(ContextInfo):
    item: str = Field(description='Id of the ledger item the text became (forget it with {"item": id}).')


class ContextList(BaseModel):
    contexts: list[ContextInfo]


class LedgerEntry(BaseModel):
    id: str
    source: Literal["create", "absorb", "remember"] = Field(description="The request that absorbed the text.")
    sha256: str = Field(description="Digest of the text's UTF-8 bytes.")
    num_tokens: int = Field(description="Tokens of the text's state.")
    created: float = Field(description="Unix seconds.")
    text: str


class Ledger(BaseModel):
    """What a context absorbed, one item per text, oldest first (contexts older than ledgers may hold more)."""

    items: list[LedgerEntry]


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


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatOptions(_Strict):
    """genadapter's own request options (OpenAI clients send them with `extra_body={"genadapter": {...}}`)."""

    remember: bool | Literal["user", "exchange"] = Field(
        False,
        description='After answering, absorb the conversation into the context (`model` must be a context): "user" '
        '(or true) its user turns, "exchange" the whole exchange including the answer. The ledger lists it.',
    )


class ChatRequest(BaseModel):
    """OpenAI chat completion request. temperature 0 (the default) decodes greedily."""

    model_config = ConfigDict(extra="ignore")  # other OpenAI fields (user, metadata, ...) do not change the answer

    model: str = Field(description=f"A context id, or {BASE_MODEL!r} for the base model without adapter.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    stream: bool | None = Field(None, description="Server-sent events, one chunk per piece of text, then [DONE].")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 (default): greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling; 1 (default): off.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed and request: the same answer.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first.")
    logprobs: bool | None = Field(None, description="Not supported: true is refused.")
    genadapter: ChatOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


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


class ChatResult(BaseModel):
    """genadapter's own part of a chat completion (null when the request asked for none of it)."""

    remembered: str | None = Field(None, description="Id of the ledger item the conversation became (remember).")
    not_remembered: str | None = Field(
        None, description="Why a conversation asked to be remembered was not: the answer filled the quota."
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str
    genadapter: ChatResult | None = None


class Model(BaseModel):
    id: str = Field(description=f"{BASE_MODEL!r} (no adapter) or a context id.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


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
