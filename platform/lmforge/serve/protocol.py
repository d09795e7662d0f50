"""OpenAI request schemas and the error envelope.

Requests are validated here, before any model work: a wrong field is a 400 that names it.
Fields the OpenAI API has but this server does not act on (user, ...) are ignored, so
unchanged OpenAI clients work; what would change the output if acted on (penalties other than
0, a non-empty logit_bias) is refused rather than ignored. Text holding a lone UTF-16 surrogate
(JSON "\\ud800", which no encoder can write) is refused wherever it is.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

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


SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value: Any, where: str = "") -> str | None:
    """The path (e.g. `messages.0.content`) of the first string in a JSON value holding a lone
    surrogate, or None."""
    if isinstance(value, str):
        return where if SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and SURROGATE.search(key):
            return f"{where}.{key!a}".lstrip(".")
        found = find_surrogate(item, f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


class Body(BaseModel):
    """A request body: no lone surrogate anywhere (they make a tokenizer or the JSON encoder
    raise later, a 500), refused as a 400 that names the field."""

    @model_validator(mode="before")
    @classmethod
    def _no_surrogates(cls, data: Any) -> Any:
        where = find_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{where}: the text holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                "a character; send valid Unicode (pair surrogates, or UTF-8)",
                {"where": where or "body"},
            )
        return data


class _Request(Body):
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
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; send 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported; leave it out or send {}")
        return None

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


class ChatMessage(Body):
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


class TokenizeRequest(Body):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name (default: the first served model)")
    prompt: str | None = Field(None, description="text to tokenize")
    messages: list[ChatMessage] | None = Field(None, description="or a chat to render first")
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens")
    add_generation_prompt: bool = Field(True, description="with messages: open the answer turn")


class DetokenizeRequest(Body):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name (default: the first served model)")
    tokens: list[int] = Field(..., description="token ids")
