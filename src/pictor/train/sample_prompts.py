"""The prompts of `--sample-prompts FILE`, in kohya's format: one prompt per line (blank lines and # comments
skipped), each optionally followed by kohya's per-prompt options, which sd-scripts' files carry:

    a red circle on grass --n blurry, low quality --d 42 --s 28 --l 3.5 --w 64 --h 48

`--n` negative prompt, `--d` seed (else the line's number among the prompts, from 0), `--s` steps, `--l` or
`--g` guidance (kohya's CFG scale and FLUX.1-dev guidance: pictor's previews have one guidance value,
applied as CFG or, on a guidance-distilled model, to its guidance embedding), `--w` / `--h` width and
height (multiples of 16). Without them a line takes the run's `--sample-steps`, `--sample-guidance` and
size. kohya's other options (sampler `--ss`, flow shift `--fs`, ...) are not pictor's: they are reported
and left out, never read as part of the prompt.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from pictor.notices import PictorWarning

MAX_SAMPLE_PROMPTS = 64
SIDE_MULTIPLE = 16  # FLUX.1's 8x autoencoder and 2x2 patches; every pictor preset divides it
MAX_SIDE = 4096


class SamplePromptError(ValueError):
    """A --sample-prompts file that cannot be used, with what to change."""


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the file; None leaves a setting to the run's."""

    prompt: str
    negative: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    ignored: tuple[str, ...] = ()  # kohya options that pictor does not read, as written ("--ss euler")


_OPTION = re.compile(r"(\w+)\s+(.*)", re.DOTALL)
_READ = ("n", "d", "s", "l", "g", "w", "h")


def parse_line(line: str, where: str) -> SamplePrompt:
    """A prompt line with kohya's options (split on " --", as sd-scripts does)."""
    prompt, *parts = (" " + line.strip()).split(" --")  # a line that starts with an option has no prompt
    values: dict[str, str] = {}
    ignored: list[str] = []
    for part in parts:
        match = _OPTION.fullmatch(part.strip())
        if match is None or match.group(1).lower() not in _READ:
            ignored.append(f"--{part.strip()}")
            continue
        key, value = match.group(1).lower(), match.group(2).strip()
        if key in ("l", "g") and "guidance" in values and values["guidance"] != value:
            raise SamplePromptError(f"{where}: --l {values['guidance']} and --g {value}: give one guidance")
        values["guidance" if key in ("l", "g") else key] = value

    def number(key: str, kind: type[int] | type[float]) -> int | float | None:
        if key not in values:
            return None
        try:
            return kind(values[key])
        except ValueError:
            raise SamplePromptError(f"{where}: --{key} {values[key]!r} is not a number") from None

    seed, steps, width, height = (number(k, int) for k in ("d", "s", "w", "h"))
    guidance = number("guidance", float)
    if seed is not None and not 0 <= seed < 2**63:
        raise SamplePromptError(f"{where}: seed --d {seed} must lie in [0, 2**63)")
    if steps is not None and not 1 <= steps <= 1000:
        raise SamplePromptError(f"{where}: steps --s {steps} must lie in [1, 1000]")
    if guidance is not None and not 0 <= guidance <= 100:
        raise SamplePromptError(f"{where}: guidance {guidance} must lie in [0, 100]")
    for name, side in (("--w", width), ("--h", height)):
        if side is not None and (side % SIDE_MULTIPLE or not SIDE_MULTIPLE <= side <= MAX_SIDE):
            raise SamplePromptError(
                f"{where}: {name} {side} must be a multiple of {SIDE_MULTIPLE} in "
                f"[{SIDE_MULTIPLE}, {MAX_SIDE}]"
            )
    if not prompt.strip():
        raise SamplePromptError(f"{where}: options but no prompt before them")
    return SamplePrompt(
        prompt.strip(),
        values.get("n", ""),
        None if seed is None else int(seed),
        None if steps is None else int(steps),
        guidance,
        None if width is None else int(width),
        None if height is None else int(height),
        tuple(ignored),
    )


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a --sample-prompts file (see the module docstring), or a SamplePromptError."""
    file = Path(path)
    if not file.is_file():
        raise SamplePromptError(
            f"--sample-prompts {path}: no such file; give a text file with one prompt per line"
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SamplePromptError(f"--sample-prompts {path}: not UTF-8 text; save it as UTF-8") from None
    prompts = [
        parse_line(line, f"--sample-prompts {path} line {number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise SamplePromptError(
            f"--sample-prompts {path}: no prompts in it (one per line; # starts a comment)"
        )
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        raise SamplePromptError(
            f"--sample-prompts {path}: {len(prompts)} prompts; a grid takes at most {MAX_SAMPLE_PROMPTS}"
        )
    return prompts


def report_ignored_options(lines: list[SamplePrompt], path: str | Path) -> None:
    """kohya's options that pictor does not read are left out of the prompts: say which, once."""
    ignored = sorted({option.split()[0] for line in lines for option in line.ignored})
    if ignored:
        warnings.warn(
            f"--sample-prompts {path}: {', '.join(ignored)} left out (pictor's sample grids read --n, --d, "
            "--s, --l or --g, --w and --h; the sampler is Euler)",
            PictorWarning,
            stacklevel=3,
        )
