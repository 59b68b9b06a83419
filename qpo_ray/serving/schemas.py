"""The HTTP contract of the serving app: request/response bodies, how invalid input is
answered (always a 4xx naming the field, never a 500). Who may call and how much they
may send: qpo_ray.serving.guard.

Kept free of Ray so the contract can be read (and unit-tested) on its own.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

# Rewards are min-max normalised to 0-100 over the dataset (QPO.md, "Rewards"), so a
# target outside that range asks the policy for something it never saw.
REWARD_MIN = 0.0
REWARD_MAX = 100.0

# Strict: a JSON number only (ints accepted, booleans and numeric strings refused).
Reward = Annotated[float, Field(strict=True, ge=REWARD_MIN, le=REWARD_MAX, allow_inf_nan=False)]


class _Request(BaseModel):
    # A misspelt field ("reward" for "target_reward") is refused rather than ignored.
    model_config = ConfigDict(extra="forbid")

    query: StrictStr

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or whitespace only")
        return value


class PromptRequest(_Request):
    target_reward: Reward = 100.0


class AnswerRequest(_Request):
    target_reward: Reward = 100.0


class PromptResponse(BaseModel):
    prompt: str
    policy_version: str
    target_reward: float


class AnswerResponse(PromptResponse):
    # The target LLM's greedy answer to prompt + query, as the task formats it.
    answer: str
    target_model: str
    # Label-scored tasks only: the verbalizer with the highest log-likelihood, and all
    # of them (what evaluation uses as the prediction).
    label: Optional[str] = None
    label_logprobs: Optional[dict[str, Optional[float]]] = None


class VersionResponse(BaseModel):
    policy_version: str
    policy_uri: str
    loaded_at_unix_s: float


def check_query_length(query: str, max_chars: int) -> None:
    """The size limit comes from the config at run time, so it is checked here rather than
    in the static model; it fails the same way a model constraint would."""
    if len(query) > max_chars:
        raise RequestValidationError([{
            "type": "string_too_long",
            "loc": ("body", "query"),
            "msg": f"query is {len(query)} characters long; the limit is {max_chars} "
                   f"(serve.max_query_chars)",
            "input": None,
        }])


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "query") -> "query"; a body that is not an object has loc ("body",).
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or "body"


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON at all, 422 for JSON with a bad field; both list
    each problem as {field, message} so a client sees what to fix."""
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return JSONResponse(status_code=400, content={
            "error": "malformed JSON body",
            "errors": [{"field": "body", "message": f"not valid JSON: {detail}".strip()}],
        })
    problems = []
    for e in errors:
        message = e.get("msg", "invalid value")
        if e.get("type") == "missing":
            message = "field required"
        elif e.get("type") == "extra_forbidden":
            message = "unknown field"
        problems.append({"field": _field_name(tuple(e.get("loc", ()))), "message": message})
    return JSONResponse(status_code=422, content={"error": "invalid request", "errors": problems})


def finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN/inf: a log-probability of -inf is sent as null."""
    return value if math.isfinite(value) else None
