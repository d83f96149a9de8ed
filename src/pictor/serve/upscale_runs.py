"""An upscale job (``POST /v1/images/upscale``, ``POST /v1/jobs/upscales``) as the worker runs it, and the
checks its settings get both when it is sent and when it runs.

The kept picture goes through the server's upscale model with `upscaling.upscale_image`, the function `pictor
upscale` runs, so the pixels are the CLI's. Progress is one step per tile the model runs (a forward hook on
the net counts them), so a cancel or the job timeout stops the job between two tiles, as a sampler run
stops between two steps. The result's record is `upscaling.upscaled_record`'s: a picture pictor generated
keeps its own record with the upscale added (its pictor chunk is kept with the upload, see
`Store.write_upload`), any other picture is named by its pixels' hash, so that `pictor reproduce RESULT
--source UPLOAD` checks and upscales the kept upload again.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from pictor import __version__
from pictor.editing import load_image
from pictor.models.offload import bring_in
from pictor.pipeline import MAX_SEED, GeneratedImage, GenerationError, Pipeline
from pictor.provenance import ProvenanceError, png_info, read_record
from pictor.record_checks import check_record
from pictor.serve.a1111_postprocess import MAX_RUNS, finish, model_picture
from pictor.serve.store import Store
from pictor.upscaler_files import UpscalerFile
from pictor.upscaling import tile_count, upscale_image, upscale_problem, upscale_record, upscaled_record


class UpscalerUnavailable(Exception):
    """The server has no upscale model now, or another one than the job was sent for: not the client's
    fault (the server was restarted with other settings while the job waited)."""


def usable_record(record: Any) -> dict[str, Any] | None:
    """A picture's pictor record as its upscale keeps it: a generation (or edit) record that `pictor
    reproduce` can run again and whose A1111 text can be written; None for anything else (an upscale's
    record, a damaged or hand-made one), whose upscale then names the picture's pixels instead."""
    if not isinstance(record, dict) or "prompt" not in record or "upscale" in record:
        return None
    try:
        check_record(record)
        seed = record.get("seed")
        if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):  # the store keeps it as a SQLite INTEGER
            return None
        png_info(record)  # its PNG chunks, as the result's file holds them: a record they cannot hold is none
    except Exception:  # untrusted JSON from an uploaded file: any failure means "not usable"
        return None
    return record


def check_upscaler(pipe: Pipeline, params: dict[str, Any]) -> UpscalerFile:
    """The loaded upscale model, if it is the one the job was sent for (by its hash)."""
    upscaler = pipe.upscaler
    sent_for = params.get("upscaler_sha256")
    if upscaler is None:
        raise UpscalerUnavailable(
            f"this upscale job was sent for the upscale model '{params.get('upscaler')}', but the server has "
            "none loaded now (it was restarted without --upscaler); start it with --upscaler FILE and send "
            "the job again"
        )
    if sent_for is not None and upscaler.sha256 != sent_for:
        raise UpscalerUnavailable(
            f"this upscale job was sent for the upscale model '{params.get('upscaler')}' (SHA-256 "
            f"{str(sent_for)[:10]}), but the server has '{upscaler.name}' (SHA-256 {upscaler.sha256[:10]}) "
            "loaded now; send the job again"
        )
    return upscaler


def check_hires_upscaler(pipe: Pipeline, params: dict[str, Any], key: str = "hires_upscaler") -> None:
    """A generation sent with a hires upscale model (or an upscaling edit with one: `key` "upscaler") runs
    only where that model is loaded; a server restarted without it (or with another) is the server's fault,
    not the request's, so this is no request error."""
    wanted = params.get(key)
    if not wanted or wanted.lower() == "lanczos":
        return
    if pipe.upscaler is not None and pipe.upscaler.name == wanted:
        return
    now = f"'{pipe.upscaler.name}'" if pipe.upscaler is not None else "none"
    what = "hires upscale model" if key == "hires_upscaler" else "upscale model"
    raise UpscalerUnavailable(
        f"this job was sent for the {what} '{wanted}', but the server has {now} loaded now (it was restarted "
        "with other settings); start it with --upscaler FILE and send the job again"
    )


def picture_and_record(path: Any) -> tuple[Image.Image, dict[str, Any] | None]:
    """A kept upload: the picture as the job upscales it, and its usable pictor record (or None)."""
    picture = load_image(path, "image")
    try:
        record = read_record(path)
    except ProvenanceError:
        record = None
    return picture, usable_record(record)


def extras_runs(spec: dict[str, Any]) -> int:
    """The model runs of an Extras job (`a1111_extras.plan`: 1 to 3)."""
    runs = spec.get("runs")
    if not isinstance(runs, int) or isinstance(runs, bool) or not 1 <= runs <= MAX_RUNS:
        raise GenerationError(
            f"this Extras upscale job has no valid model runs (1 to {MAX_RUNS}); send it again"
        )
    return runs


def run_upscale(pipe: Pipeline, params: dict[str, Any], store: Store, progress: Any) -> list[GeneratedImage]:
    """Run an upscale job: its one image, with its record (and seed: its source's, or 0)."""
    upscaler = check_upscaler(pipe, params)
    scale, tile, overlap = params.get("scale"), int(params["tile"]), int(params["overlap"])
    extras = params.get("a1111_extras") if isinstance(params.get("a1111_extras"), dict) else None
    runs = extras_runs(extras) if extras is not None and "runs" in extras else None  # None: older jobs
    # Checked when it was sent; again here, for a job sent to another server's settings before a restart.
    # An Extras job runs the model A1111's number of times, bounded by the pixel limit, not by pictor's x16.
    problem = upscale_problem(None if runs is not None else scale, tile, overlap)
    if problem:
        raise GenerationError(problem)
    factor = float(upscaler.scale) if scale is None or runs is not None else float(scale)
    picture, source_record = picture_and_record(store.upload_path(params["image"]))
    if runs is None:
        total = tile_count(upscaler.net, picture.width, picture.height, factor, tile)
    else:
        s = upscaler.scale
        total = sum(
            tile_count(upscaler.net, picture.width * s**i, picture.height * s**i, s, tile)
            for i in range(runs)
        )
    done = 0

    def tile_done(*_: Any) -> None:
        nonlocal done
        done += 1
        progress(done, max(total, done))  # the server's callback: raises to cancel or time the job out

    hook = upscaler.net.register_forward_hook(tile_done)
    try:
        bring_in(upscaler.net)  # under CPU offload: in before the upscale puts its input where it is
        if runs is None:
            image = upscale_image(upscaler, picture, factor, tile, overlap)
        else:  # sent by /sdapi/v1/extra-*: A1111's runs, then its size, crop and blend
            image = model_picture(upscaler, picture, runs, tile, overlap)
    finally:
        hook.remove()
        pipe.release_offload()  # no sampler run released it: the model must not stay on the device
    upscale = upscale_record(upscaler, factor ** (runs or 1), tile, overlap)
    if extras is not None:
        image, upscale["a1111_extras"] = finish(picture, image, extras)
    upscale |= {"width": image.width, "height": image.height}
    record = upscaled_record(source_record, picture, upscale, __version__)
    seed = record.get("seed")
    return [GeneratedImage(image, seed if isinstance(seed, int) and 0 <= seed <= MAX_SEED else 0, record)]
