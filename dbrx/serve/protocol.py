"""The OpenAI-compatible wire format of the server: request models (validated) and response models (serialized).

Requests are strict where OpenAI's API is (no "5" for an integer, no 1 for a boolean, no NaN), and ignore fields
this server does not use (user, logit_bias, ...) so that ordinary OpenAI clients are served. Fields OpenAI allows
to be null are optional here; the server fills in the defaults.

Imports: pydantic only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

MAX_LOGPROBS = 20  # OpenAI's limit on top log-probabilities per token


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_prompt(value: Any) -> list[str] | list[list[int]]:
    """A completions prompt as one entry per choice: a list of strings or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(_is_token_id(v) for v in value):
            return [value]
        if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
            return value
    raise ValueError("must be a string, a list of strings, a list of token ids (ints >= 0) or a list of such "
                     "lists, none of them empty")


def _parse_stop(value: Any) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (null or [] for none)."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError("must be a non-empty string or a list of non-empty strings")
    return tuple(stops)


def _parse_content(value: Any) -> str:
    """A message's content: a string, or a list of text parts (joined); null is the empty string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError("must be a string or a list of {'type': 'text', 'text': ...} parts")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False


class ModelRequest(_Request):
    """A request that may name the served model (another name is a 404)."""

    model: str | None = None


class SamplingRequest(ModelRequest):
    """Fields shared by both endpoints. top_k and repetition_penalty are vLLM's extensions (-1 or 0: no top-k)."""

    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: Annotated[tuple[str, ...], PlainValidator(_parse_stop)] = ()
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `logprobs` asks for that many top log-probabilities per token (with `echo`, for the
    prompt's tokens too)."""

    prompt: Annotated[list, PlainValidator(_parse_prompt)]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, PlainValidator(_parse_content)] = ""


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. max_completion_tokens is OpenAI's newer name for max_tokens."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(ModelRequest):
    """POST /tokenize (vLLM's): the token ids of `prompt`, special-token text included as the special token (as
    Hugging Face tokenizers and vLLM do; lm-eval's remote tokenizer finds the eos id this way). DBRX's tokenizer adds
    no bos or eos, so `add_special_tokens` changes nothing."""

    prompt: str
    add_special_tokens: bool | None = True


class DetokenizeRequest(ModelRequest):
    """POST /detokenize (vLLM's): the text of token ids."""

    tokens: list[Annotated[int, Field(ge=0)]]


# ---- responses ----------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability (None for the first prompt token), top
    alternatives by text, and offset of the token's text in the choice's text."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with usage None, or with no choices and the usage) one chunk of a stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's): what lm-eval's remote tokenizer reads (the special tokens' text)."""

    tokenizer_class: str
    eos_token: str
    bos_token: str
    pad_token: str
    model_max_length: int


class ModelCard(BaseModel):
    """A served model: the base model, or a LoRA adapter on it (`parent` its id, as vLLM lists adapters)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "databricks"
    max_model_len: int
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
