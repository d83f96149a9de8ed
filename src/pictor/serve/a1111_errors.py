"""Errors as AUTOMATIC1111's API answers them, for the ``/sdapi`` routes: ``{"error", "detail", "body",
"errors"}`` (A1111's ``api_middleware``), where clients show ``detail``. pictor's errors keep their status,
except that a 400 naming a field is a 422, as A1111 answers a bad field (another model than the one served
stays a 400); ``field`` names it.

Kept apart from `a1111_api` so that the guard (`security`) can answer an unauthenticated ``/sdapi`` request
in these words without importing the routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pictor.serve.errors import APIError

A1111_PREFIX = "/sdapi"


def is_a1111_path(path: str) -> bool:
    return path == A1111_PREFIX or path.startswith(A1111_PREFIX + "/")


class A1111Error(BaseModel):
    """An error of the ``/sdapi`` routes. (Not named ...ErrorResponse: the document's OpenAI errors are.)"""

    error: str = Field(description="What kind of error (pictor's code, e.g. invalid_parameters).")
    detail: str = Field(description="One sentence: what is wrong and what to do; what clients show.")
    body: str = Field("", description="Empty (A1111 puts the request body here for validation errors).")
    errors: str = Field("", description="The same sentence as detail.")
    field: str | None = Field(None, description="pictor: the request field the error is about, if one.")


LABELS = {"width": "width, height"}  # how a message about the size starts


def field_error(name: str, message: str, code: str = "invalid_parameters") -> APIError:
    """A 400 about an A1111 field (a 422 on the wire), its message starting with the field's name."""
    return APIError(400, f"{LABELS.get(name, name)}: {message}", param=name, code=code)


def a1111_status(error: APIError) -> int:
    """A 400 about a field is a 422 here, as A1111 answers a field it cannot take; asking for another model
    than the one served stays a 400."""
    field = error.param is not None and error.code != "model_not_found"
    return 422 if error.status == 400 and field else error.status


def a1111_body(error: APIError) -> dict[str, Any]:
    code = error.code or error.type
    return A1111Error(error=code, detail=error.message, errors=error.message, field=error.param).model_dump()


def a1111_response(error: APIError) -> JSONResponse:
    return JSONResponse(a1111_body(error), status_code=a1111_status(error), headers=error.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """A body that does not fit the A1111 schema: the first problem, named by its field."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(422, "the request body is not valid JSON; send a JSON object", code="invalid_json")
    if not loc:
        message = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
        return APIError(422, message, code="invalid_request")
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = f"{where}: {first.get('msg', 'invalid value')}{more}"
    return APIError(422, message, code="invalid_request", param=loc[0])


class A1111Route(APIRoute):
    """A route whose errors, its body's validation included, answer in A1111's shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return a1111_response(exc)
            except RequestValidationError as exc:
                return a1111_response(validation_error(exc))
            except StarletteHTTPException as exc:  # a body over the cap (413), a body that is not UTF-8...
                message = str(exc.detail)
                if exc.status_code == 400 and message == "There was an error parsing the body":
                    message = "the request body could not be read as JSON: send a JSON object in UTF-8"
                error = APIError(exc.status_code, message, code="invalid_request", headers=exc.headers)
                return a1111_response(error)

        return answer
