"""The request field ``guidance_method`` (`pictor.guidance_methods`): how classifier-free guidance combines
the prompt's and the negative prompt's predictions, as an object of `GuidanceMethod`'s fields (``method``,
``rescale``, ``start``, ``stop``, ``eta``, ``norm_threshold``, ``momentum``, ``zero_init_steps``; those
left out take their defaults) in a JSON body, or that object's JSON text in an edit's multipart form (as
``regions`` and ``layout`` go).

The values are checked by the dataclass itself, known without the model (so also while it loads): a bad one
is a 400 whose ``param`` is ``guidance_method.<field>``. What a job keeps is the method's record
(`GuidanceMethod.record`: the method and the parameters it reads), or None for plain CFG over every step,
so that equal methods batch together and a job without one reads as before it existed. Refusals that need
the model and the run (a guidance-distilled model, guidance 1, an interval holding none of the steps) are
the pipeline's, named by `pipeline_errors`."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from pictor.guidance_methods import GuidanceMethod, GuidanceMethodError
from pictor.serve.errors import APIError

FIELD = "guidance_method"
FIELDS = tuple(f.name for f in fields(GuidanceMethod))
EXAMPLE = '{"method": "apg", "eta": 0, "stop": 0.7}'


def _refuse(message: str, field: str | None = None) -> APIError:
    param = f"{FIELD}.{field}" if field else FIELD
    return APIError(400, message, param=param, code="invalid_parameters")


def checked_guidance_method(value: Any) -> dict[str, Any] | None:
    """A request's ``guidance_method`` (an object, its JSON text, or None) as the job keeps it: the method's
    record, or None when absent or plain CFG over every step. A 400 names ``guidance_method.<field>``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _refuse(f"{FIELD} must be a JSON object such as {EXAMPLE}") from None
    if not isinstance(value, dict):
        raise _refuse(f"{FIELD} must be an object of {', '.join(FIELDS)}, such as {EXAMPLE}")
    unknown = sorted(str(k) for k in value if k not in FIELDS)
    if unknown:
        raise _refuse(f"unknown field '{FIELD}.{unknown[0]}'; {FIELD} takes {', '.join(FIELDS)}", unknown[0])
    try:
        method = GuidanceMethod(**value)
    except GuidanceMethodError as exc:
        raise _refuse(f"{FIELD}.{exc.field}: {exc}", exc.field) from None
    return None if method.is_default else method.normalized().record()


def guidance_method_of(params: dict[str, Any]) -> GuidanceMethod | None:
    """A job's kept ``guidance_method`` (`checked_guidance_method`) as the request's; None for plain CFG
    (and for jobs queued before it existed)."""
    kept = params.get(FIELD)
    return GuidanceMethod.from_record(kept) if kept else None
