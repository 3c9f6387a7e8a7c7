"""`POST /v1/generate`: one pipelined generation led by this node (JSON in, JSON out).

The route `kowalski-node generate` calls. The OpenAI-compatible API calls
`PipelineGenerator.generate/stream` in-process instead; this is the plain, documented way
to drive the pipeline from outside until then, and stays useful for benchmarks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kowalski_node.errors import ModelNotFound, NoCapableDevice
from kowalski_node.inference.errors import InferenceError, ShardingUnsupported
from kowalski_node.inference.pipeline import GenerateRequest

MAX_BODY = 8 * 1024 * 1024


class GenerateBody(BaseModel):
    """The JSON body of POST /v1/generate (exactly one of messages, prompt, prompt_tokens)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[tuple[str, str]] | None = None
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = Field(default=128, ge=0, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=8)
    sharding: Literal["auto", "pipeline", "tensor"] | None = None
    stages: int | None = Field(default=None, gt=0)
    exclude: list[str] = Field(default_factory=list)
    exact_replay: bool | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        given = sum(x is not None for x in (self.messages, self.prompt, self.prompt_tokens))
        if given != 1:
            raise ValueError("give exactly one of messages, prompt or prompt_tokens")
        return self

    def to_request(self) -> GenerateRequest:
        return GenerateRequest(
            model=self.model,
            messages=self.messages,
            prompt=self.prompt,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            sharding=self.sharding,
            stages=self.stages,
            exclude=tuple(self.exclude),
            exact_replay=self.exact_replay,
        )


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def generate_routes(service: Any) -> list[Route]:
    """The route, bound to the inference services of `service` (a `NodeServiceImpl`)."""

    async def generate(request: Request) -> Response:
        inference = getattr(service, "inference", None)
        if inference is None:
            return _error(404, "not_available", "this node does not run pipelined inference")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(413, "too_large", f"body over {MAX_BODY} bytes")
        try:
            body = GenerateBody.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            return _error(400, "invalid_request", f"{where}: {err['msg']}")
        try:
            result = await inference.generator.generate(body.to_request())
        except ShardingUnsupported as exc:
            return _error(400, "sharding_unsupported", str(exc))
        except ModelNotFound as exc:
            return _error(404, "model_not_found", str(exc))
        except NoCapableDevice as exc:
            return _error(503, "no_capable_device", str(exc))
        except InferenceError as exc:
            return _error(502, "inference_failed", str(exc))
        return JSONResponse(result.to_dict())

    return [Route("/v1/generate", generate, methods=["POST"])]
