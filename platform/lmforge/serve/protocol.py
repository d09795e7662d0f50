"""OpenAI request schemas and the error envelope.

Requests are validated here, before any model work: a wrong field is a 400 that names it.
Fields the OpenAI API has but this server does not act on (user, logit_bias, ...) are ignored,
so unchanged OpenAI clients work; penalties other than 0 are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.model.generate import SamplingParams


class APIError(Exception):
    """An error answered in the OpenAI envelope: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="the served model's name (GET /v1/models lists them)")
    max_tokens: int | None = Field(None, ge=0, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(-1, ge=-1, description="sample among the k most likely (-1 or 0: all)")
    n: int = Field(1, ge=1, description="choices per prompt")
    stream: bool = Field(False, description="server-sent events, ending with data: [DONE]")
    stream_options: dict[str, Any] | None = Field(
        None, description="{include_usage: true} adds a usage chunk"
    )
    stop: str | list[str] | None = Field(None, description="stop strings (not in the output)")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="per-request seed: same seed, same sample"
    )
    presence_penalty: float = Field(0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, description="not supported: must be 0")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; send 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int, logprobs: int | None, echo: bool, i: int) -> SamplingParams:
        """The sampling params of choice i (seeded choices differ by their index)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            # Wrapped so that choice i of a seed near the top stays in torch's seed range.
            seed=None if self.seed is None else (self.seed + i) % 2**63,
            stop=self.stop_list(),
            logprobs=logprobs,
            echo=echo,
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token-id lists"
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="top logprobs per token")
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to the output")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and (not value or any(v == [] or v == "" for v in value)):
            raise ValueError("the prompt must not be empty")
        if value == "":
            raise ValueError("the prompt must not be empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"] = Field(..., description="who speaks")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="text, or a list of {type: text, text} parts"
    )

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation")
    max_completion_tokens: int | None = Field(None, ge=0, description="alias of max_tokens")
    logprobs: bool = Field(False, description="return each output token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: top k")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name (default: the first served model)")
    prompt: str | None = Field(None, description="text to tokenize")
    messages: list[ChatMessage] | None = Field(None, description="or a chat to render first")
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens")
    add_generation_prompt: bool = Field(True, description="with messages: open the answer turn")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name (default: the first served model)")
    tokens: list[int] = Field(..., description="token ids")
