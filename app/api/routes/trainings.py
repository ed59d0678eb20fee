"""POST/GET /trainings, GET/DELETE /trainings/{id} and GET /trainings/{id}/events: training jobs over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from app.api.deps import AdminDep
from app.api.errors import error_body
from app.api.schemas import ErrorResponse, Training, TrainingList, TrainingRequest
from app.api.sse import event_stream, sse
from app.errors import InvalidRequestError, RnnserveError
from app.jobs.service import Trainings
from app.jobs.spec import TrainingSpec

router = APIRouter(prefix="/trainings", tags=["trainings"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 404, 503)}
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422, 429, 503)
}
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["name", "text"],
    "properties": {
        "text": {"type": "string", "format": "binary", "description": "The text to learn from, as a UTF-8 file."},
        **{k: v for k, v in TrainingRequest.model_json_schema()["properties"].items() if k != "text"},
    },
}
BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": TrainingRequest.model_json_schema()},
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
        },
    }
}


async def read_request(request: Request) -> TrainingRequest:
    """The job's fields from a JSON body, or from a multipart form whose `text` is a file or a field."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            fields: dict[str, Any] = {}
            async with request.form() as form:  # closes the uploaded files' spools
                for key, value in form.items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        try:
                            fields[key] = data.decode("utf-8")
                        except UnicodeDecodeError:
                            raise InvalidRequestError(f"{key}: the file is not UTF-8 text", param=key) from None
                    else:
                        fields[key] = value
            return TrainingRequest.model_validate(fields)
        return TrainingRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


async def trainings(conn: HTTPConnection) -> Trainings:
    return conn.app.state.trainings


JobsDep = Annotated[Trainings, Depends(trainings)]


def wire(record: dict[str, Any]) -> Training:
    return Training.model_validate(record)


@router.post("", status_code=202, response_model=Training, responses=SUBMIT_ERRORS, openapi_extra=BODY)
async def create_training(request: Request, jobs: JobsDep, owner: AdminDep) -> Training:
    """Queue a training job: a model called `name` learnt from `text` (JSON, or multipart with a text file)."""
    body = await read_request(request)
    spec = TrainingSpec(body.name, body.arch, body.hidden_size, body.num_layers, body.minutes, body.overwrite)
    return wire(await jobs.submit(spec, body.text, owner))


@router.get("", response_model=TrainingList, responses=ERRORS)
async def list_trainings(jobs: JobsDep, owner: AdminDep) -> TrainingList:
    """This key's training jobs, newest first."""
    return TrainingList(trainings=[wire(r) for r in await jobs.list(owner)])


@router.get("/{training_id}", response_model=Training, responses=ERRORS)
async def get_training(training_id: str, jobs: JobsDep, owner: AdminDep) -> Training:
    """A training job: its status, progress, loss curve and, once finished, its metrics or error."""
    return wire(await jobs.get(training_id, owner))


@router.delete("/{training_id}", response_model=Training, responses={**ERRORS, 409: {"model": ErrorResponse}})
async def cancel_training(training_id: str, jobs: JobsDep, owner: AdminDep) -> Training:
    """Cancel a queued or running training job (a running one stops within seconds; no model is written)."""
    return wire(await jobs.cancel(training_id, owner))


@router.get(
    "/{training_id}/events",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "progress events"}},
    response_class=StreamingResponse,
)
async def training_events(training_id: str, jobs: JobsDep, owner: AdminDep) -> StreamingResponse:
    """Server-Sent Events: `progress` (the job) whenever it changes, then one `done` at its final status."""
    events = jobs.events(training_id, owner)
    first = await anext(events)  # a 404 before the stream starts

    async def frames() -> AsyncIterator[str]:
        item = first
        try:
            while True:
                if item is None:
                    yield ": keep-alive\n\n"
                else:
                    yield sse(item[0], wire(item[1]).model_dump())
                    if item[0] == "done":
                        return
                item = await anext(events)
        except RnnserveError as e:  # after the first byte an error is an event
            yield sse("error", error_body(e.type, e.message, e.param))
        finally:
            await events.aclose()

    return event_stream(frames())
