"""Live previews of running jobs (`pictor.latent_preview`): the worker keeps each running job's newest
preview as JPEG bytes, which `GET /v1/jobs/{id}/preview` serves and a `preview` event announces.

A sampler run may hold several merged jobs (`job_requests.take_batch`): image i of the run belongs to the
job whose share of the run's images holds i, and each job is shown by its own first image in the frame.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from pictor.serve.job_requests import Live

# A preview is looked at once and replaced a step later: a JPEG of this quality is a fraction of a PNG's
# bytes (a `full` preview of 512 px: ~40 kB against ~400 kB) and looks the same at a glance.
JPEG_QUALITY = 85


def preview_jpeg(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def shown_by_job(
    batch: list[Live], pictures: list[Image.Image], first_index: int
) -> list[tuple[Live, Image.Image]]:
    """Each job of `batch` with a picture in this frame (`pictures` are the run's images from request index
    `first_index` on), paired with its first one there; jobs are in request order, n images each."""
    shown = []
    start = 0
    for live in batch:
        own = range(max(start, first_index), min(start + live.job.n, first_index + len(pictures)))
        if own:
            shown.append((live, pictures[own.start - first_index]))
        start += live.job.n
    return shown


def frame_handler(
    batch: list[Live], store_preview: Callable[[Live, bytes], None]
) -> Callable[[list[Image.Image], int], None]:
    """`Previews.on_frame` for a run of these jobs: each shown job's preview, encoded, handed to
    `store_preview` (which keeps it and tells the job's listeners)."""

    def on_frame(pictures: list[Image.Image], first_index: int) -> None:
        for live, picture in shown_by_job(batch, pictures, first_index):
            if not live.cancelled:
                store_preview(live, preview_jpeg(picture))

    return on_frame
