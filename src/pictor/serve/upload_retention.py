"""How long uploaded pictures are kept, and deleting them once nothing needs them.

An upload (an edit's source and mask, a reference, context, control, Redux or IP-Adapter picture, the
ControlNets' pictures, a picture to upscale: the job settings of `UPLOAD_KEYS`) belongs to the one job whose
settings name it: every request writes its own, so no two jobs share one. It is kept

- while its job is queued or running: the job reads it when it runs, and again if a restart resumes it;
- while its job is in the history as succeeded: the images' records keep only the pictures' hashes, and
  `pictor reproduce IMAGE --source/--mask/--reference/--context/--control/--redux/--ip-adapter/
  --controlnet-image PICTURE` needs the very pictures (an upscale's `--source` too), which for a variation
  (flattened, resized) or a mask made from transparency exist only here (GET /v1/jobs/{id} names them).

It is deleted when its job fails or is cancelled (no image was made from it; a running job's only once its
run has stopped reading it), when its history entry is deleted (DELETE /v1/history/{id}), and at start when no
queued, running or succeeded job names it: uploads of jobs that ended under an older pictor (which kept them
all), and of a request cut off between writing its picture and queueing its job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from pictor.serve.pipeline_errors import FORM_CONTROLNET_FILE
from pictor.serve.store import Store, valid_id

log = logging.getLogger("pictor.serve")

# The job settings that name kept uploads: an upload id each, or for controlnet_images a list of them (one
# picture per ControlNet, in order).
UPLOAD_KEYS = (
    "image",
    "mask",
    "reference",
    "context_image",
    "control_image",
    "redux_image",
    "ip_adapter_image",
    "controlnet_images",
)


def _named(value: Any) -> list[str]:
    """The upload ids a setting holds: one id, or a list of ids (controlnet_images)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and valid_id(v)]


# What pictor writes under uploads/: ID.png, and .ID.png.tmp while writing it (see Store.write_upload).
_UPLOAD_FILE = re.compile(r"^\.?(?P<id>[0-9a-f]{32})\.png(?P<tmp>\.tmp)?$")


def upload_ids(params: dict[str, Any]) -> set[str]:
    """The uploads a job's settings name."""
    return {upload for key in UPLOAD_KEYS for upload in _named(params.get(key))}


def delete_uploads(store: Store, ids: Iterable[str]) -> None:
    for upload_id in ids:
        try:
            store.upload_path(upload_id).unlink(missing_ok=True)
        except OSError as exc:  # a file that cannot go now is swept at the next start
            log.warning("could not delete upload %s: %s", upload_id, exc)


def sweep_uploads(store: Store, keep: set[str]) -> list[str]:
    """Delete the upload files (and half-written ones) whose id is not in `keep`; their names. Files pictor
    did not write are left alone."""
    swept = []
    for path in store.uploads_dir.iterdir():
        match = _UPLOAD_FILE.match(path.name)
        if match is None or (match["id"] in keep and not match["tmp"]):
            continue
        try:
            path.unlink(missing_ok=True)
            swept.append(path.name)
        except OSError as exc:
            log.warning("could not delete upload %s: %s", path, exc)
    if swept:
        log.info("deleted %d uploads that no queued, running or succeeded job names", len(swept))
    return swept


def upload_field(key: str, params: dict[str, Any]) -> str:
    """The request field a job's upload setting came from: a variation's pictures (its source, reference or
    Redux picture) all from `image`; a reference picture from `reference_image`; ControlNet pictures from a
    JSON body's `controlnet_images` or an edit form's repeated `controlnet_image`; the rest as named."""
    if params.get("variation"):
        return "image"
    if key == "reference":
        return "reference_image"
    if key == "controlnet_images" and params.get("kind") == "edit":
        return FORM_CONTROLNET_FILE
    return key


def missing_upload(store: Store, params: dict[str, Any]) -> dict[str, Any] | None:
    """The error of a job whose upload is gone (deleted by hand), or None: the pipeline would blame the
    client for it and name the server's path. Its `param` is the request field the picture was sent as."""
    for key in UPLOAD_KEYS:
        value = params.get(key)
        for index, upload in enumerate(_named(value)):
            if not store.upload_path(upload).is_file():
                field = upload_field(key, params)
                which = f"{field}[{index}]" if isinstance(value, list) else field
                message = (
                    f"{which}: the picture this job was sent with is no longer in the server's data dir "
                    f"(uploads/{upload}.png); send the request again"
                )
                return {"message": message, "type": "server_error", "code": "upload_missing", "param": field}
    return None
