"""The HTTP contract of the serving app: request/response bodies, how invalid input is
answered (always a 4xx naming the field, never a 500). Who may call and how much they
may send: qpo_ray.serving.guard.

Kept free of Ray so the contract can be read (and unit-tested) on its own.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from qpo_ray.serving.textpolicy import clean

# Rewards are min-max normalised to 0-100 over the dataset (QPO.md, "Rewards"), so a
# target outside that range asks the policy for something it never saw.
REWARD_MIN = 0.0
REWARD_MAX = 100.0

# Strict: a JSON number only (ints accepted, booleans and numeric strings refused).
Reward = Annotated[float, Field(strict=True, ge=REWARD_MIN, le=REWARD_MAX, allow_inf_nan=False)]


class _Request(BaseModel):
    # A misspelt field ("reward" for "target_reward") is refused rather than ignored.
    model_config = ConfigDict(extra="forbid")

    # Text only: no lone surrogates or control characters (serving.textpolicy).
    query: clean(StrictStr)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or whitespace only")
        return value


# A/B stickiness key (a user or session id): the same key always gets the same arm.
ClientKey = clean(Annotated[str, Field(strict=True, min_length=1, max_length=200)])
# Gold labels: a label word (label tasks) or the reference answer.
GoldLabel = clean(Annotated[str, Field(strict=True, min_length=1, max_length=200)])
# The ids the server issues (uuid4 hex); the pattern also keeps them safe as file names.
RequestId = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{32}$")]
Receipt = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]


class PromptRequest(_Request):
    target_reward: Reward = 100.0
    client_key: Optional[ClientKey] = None


class AnswerRequest(PromptRequest):
    # With the gold label, the target's answer is scored and recorded as feedback.
    label: Optional[GoldLabel] = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: RequestId
    # The `receipt` of the response being judged (serve.feedback_requires_receipt).
    receipt: Optional[Receipt] = None
    # The outcome: whether the served prompt led to a right answer, and/or a reward on
    # the 0-100 scale of target_reward. At least one of the two (check_feedback).
    correct: Optional[StrictBool] = None
    reward: Optional[Reward] = None
    label: Optional[GoldLabel] = None


class PromptResponse(BaseModel):
    prompt: str
    policy_version: str
    target_reward: float
    # Names the request in POST /v1/feedback, with the receipt (proof it was served).
    request_id: str
    receipt: str = ""
    # "a" (serve.policy_uri) or "b" (serve.ab_policy_uri).
    arm: str
    # True when the prompt came from the replica's prompt cache (no policy call).
    cached: bool
    # How the version wrote the prompt: "greedy" or "mbr" (at mbr_temperature), from its
    # champion tags unless serve.decoding overrides; recorded_decoding when not servable.
    decoding: str = "greedy"
    mbr_temperature: Optional[float] = None
    recorded_decoding: Optional[str] = None


class AnswerResponse(PromptResponse):
    # The target LLM's greedy answer to prompt + query, as the task formats it.
    answer: str
    target_model: str
    # Label-scored tasks only: the verbalizer with the highest log-likelihood, and all
    # of them (what evaluation uses as the prediction).
    label: Optional[str] = None
    label_logprobs: Optional[dict[str, Optional[float]]] = None
    # Only when the request carried the gold label: the answer matched it.
    correct: Optional[bool] = None


class FeedbackResponse(BaseModel):
    request_id: str
    policy_version: str
    arm: str
    recorded: bool = True


class VersionResponse(BaseModel):
    # Arm a's (serve.policy_uri), as before A/B; `arms` lists every served arm.
    policy_version: str
    policy_uri: str
    loaded_at_unix_s: float
    arms: list[dict[str, Any]]
    ab_traffic_percent: float
    # Prompt cache: entries, max_entries, hits, misses; policy_prompts counts the
    # prompts the policy generated (misses that reached it).
    cache: dict[str, int]
    replica_id: str


def field_error(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for one body field, in the same shape as the model's own errors."""
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": message,
                                    "input": None}])


def check_query_length(query: str, max_chars: int) -> None:
    """The size limit comes from the config at run time, so it is checked here rather than
    in the static model; it fails the same way a model constraint would."""
    if len(query) > max_chars:
        raise field_error("query", f"query is {len(query)} characters long; the limit is "
                                   f"{max_chars} (serve.max_query_chars)", "string_too_long")


def check_feedback(body: FeedbackRequest, label_words: Sequence[str]) -> None:
    """An outcome must be given; a gold label must be one of the task's label words."""
    if body.correct is None and body.reward is None:
        raise field_error("correct", "give correct (true/false) or reward (0-100)")
    check_label(body.label, label_words)


def check_label(label: Optional[str], label_words: Sequence[str]) -> None:
    if label is not None and label_words and label not in label_words:
        raise field_error("label", f"{label!r} is not one of the task's labels "
                                   f"{list(label_words)}")


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
