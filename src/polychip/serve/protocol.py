"""OpenAI-compatible request schemas and the error shape.

Errors always look like OpenAI's: {"error": {"message", "type", "param", "code"}}. Unsupported
OpenAI options (n > 1, logprobs, echo, ...) are refused with a 400 naming the option rather than
silently ignored.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2 ** 63 - 1


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
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="Sample among the k most likely tokens (0 or -1: off).")
    seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 stop strings.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens (vLLM's extension; "
                                                "benchmarks use it for fixed output lengths).")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]] = Field(..., description="Text, or token ids.")
    echo: bool = False
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
