"""kohya's repeat folders: a training folder whose subfolders are named ``<repeats>_<class tokens>``.

    train/
      10_sks dog/        every image here comes 10 times an epoch; one without a caption is "sks dog"
      1_dog/             regularisation-like pictures, once an epoch
      notes.txt

kohya's scripts (the DreamBooth-style `train_data_dir`) read only such subfolders, so that a small set of
a subject's pictures can be weighted against a larger set of others without copying files. pictor reads
them with `--folder-repeats`: the first folder of an image's path relative to the training folder says
its repeats; an image elsewhere (in the folder itself, or under a folder not so named) comes once, as
without the option. A caption from metadata.jsonl or a caption file still wins over the class tokens.
"""

from __future__ import annotations

import re
from pathlib import PurePath

_REPEAT_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$")  # kohya's name.split("_"): "10" alone is 10 repeats
# More is a typo, not a weighting (a "2024" or "2024_trip" folder is 2024 repeats, as in kohya).
MAX_REPEATS = 10_000
MAX_EPOCH_SAMPLES = 2_000_000  # an epoch's stream past this (every process holds its index) is refused


def folder_repeats(rel: PurePath) -> tuple[int, str | None, bool]:
    """(repeats, class tokens, whether in a repeat folder) of an image at `rel` (relative to the training
    folder): those its first folder's name gives, or (1, None, False) for an image not in one. Raises
    ValueError for a repeat folder that asks for no image at all (0) or a count past `MAX_REPEATS`, naming
    the folder."""
    if len(rel.parts) < 2:
        return 1, None, False
    folder = rel.parts[0]
    match = _REPEAT_FOLDER.match(folder)
    if match is None:
        return 1, None, False
    repeats = int(match.group(1))
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(
            f"repeat folder {folder!r} asks for {repeats} repeats; a repeat folder's number is how many "
            f"times its images come each epoch, from 1 to {MAX_REPEATS}: rename the folder"
        )
    tokens = (match.group(2) or "").strip()  # as kohya reads it: "10_sks_dog" is "sks_dog", underscores kept
    return repeats, tokens or None, True
