"""OpenAI-compatible request schemas and the error shape.

Errors always look like OpenAI's: {"error": {"message", "type", "param", "code"}}. Unsupported
OpenAI options (tools, response_format other than text, suffix) are refused with a 400 naming the
option rather than silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from polychip.infer import MAX_LOGPROBS

MAX_SEED = 2 ** 63 - 1
#: Most choices one request may ask for (prompts x n).
MAX_CHOICES = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


GENERATION_OK = {200: {"description": "A completion (JSON), or server-sent events when stream=true",
                       "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Unprocessable request"},
    429: {"model": ErrorResponse, "description": "Queue full; retry later"},
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="Model id from /v1/models.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy. Default: the model's "
                                         "generation_config.json, else 1.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="Default: generation_config.json, else 1.")
    top_k: Optional[int] = Field(None, ge=-1, description="Sample among the k most likely tokens (0 or -1: off). "
                                                          "Default: generation_config.json, else off.")
    seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 16 stop strings.")
    stop_token_ids: Optional[list[int]] = Field(None, description="Token ids that also end the reply (vLLM's "
                                                                  "extension; the model's EOS ids always do).")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens (vLLM's extension; "
                                                "benchmarks use it for fixed output lengths).")
    # Accepted only to be refused by name (refuse_unsupported), never silently ignored.
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, "at most 16 stop sequences are allowed", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise APIError(400, "tool calling is not supported by this server (tools/functions/tool_choice)",
                           param="tools", code="unsupported_parameter")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(400, f"response_format {kind!r} is not supported: this server does not constrain "
                                "output to JSON; ask for JSON in the prompt instead", param="response_format",
                           code="unsupported_parameter")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="Text, a list of texts, token ids, or a list of token-id lists (one choice set each).")
    max_tokens: Optional[int] = Field(None, ge=0, description="Most tokens to generate (0 with echo: score the "
                                                              "prompt only).")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Log-probabilities of each token and "
                                                                             "of this many alternatives.")
    echo: bool = Field(False, description="Return the prompt before the completion (with its log-probabilities "
                                          "when logprobs is set; the first token's is null).")
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (needs "
                                                                                "logprobs: true).")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]
