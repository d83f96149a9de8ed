"""The pictures a command works through: files as given, and for a folder the pictures directly in it
(A1111's "Batch from directory"), and for a batch of edits the mask of each picture."""

from __future__ import annotations

from pathlib import Path

from pictor.data.folder import IMAGE_EXTENSIONS

__all__ = ["masks_for", "pictures_in"]


def _pictures_of_folder(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def pictures_in(paths: list[str]) -> list[str]:
    """Files as given, and for a folder the pictures directly in it, sorted by name; a folder with none is an
    error rather than nothing done."""
    pictures: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            pictures.append(path)
            continue
        found = [str(p) for p in _pictures_of_folder(Path(path))]
        if not found:
            raise ValueError(f"{path}: no pictures in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        pictures += found
    return pictures


def masks_for(pictures: list[str], mask: str | None) -> list[str | None]:
    """Each picture's mask: none, the one file for all, or from a folder the picture of the same name
    (stem; any picture suffix), as A1111's inpaint batch mask directory. A picture without its mask there,
    or a name two masks share, is an error before anything runs."""
    if mask is None or not Path(mask).is_dir():
        return [mask] * len(pictures)
    by_stem: dict[str, Path] = {}
    for p in _pictures_of_folder(Path(mask)):
        if p.stem in by_stem:
            raise ValueError(
                f"{mask}: two masks are named {p.stem} ({by_stem[p.stem].name}, {p.name}); keep one"
            )
        by_stem[p.stem] = p
    missing = [Path(p).name for p in pictures if Path(p).stem not in by_stem]
    if missing:
        raise ValueError(
            f"{mask}: no mask for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; give each "
            "picture a mask of its name there"
        )
    return [str(by_stem[Path(p).stem]) for p in pictures]
