"""`pictor generate --variants random|all [--wildcards DIR]` and `--from-file FILE` with a tiny model: each
image is the plain `generate` image of its resolved prompt (the variants leave the noise alone), its record
holds that prompt so `pictor reproduce` remakes it, file names never collide, and every refusal is one line
before the model loads."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pictor
from pictor.checkpoint import save_bundle
from pictor.cli import main
from pictor.generation_request import GenerationRequest
from pictor.pipeline import Pipeline
from pictor.prompt_variants import link, parse_template, pick, variant_rng
from pictor.provenance import read_record

from tiny_bundle import tiny_models

FAST = ("--steps", "2", "--size", "16x16", "--device", "cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with default-initialised weights (no zeroed layers: every prompt shows)."""
    path = tmp_path_factory.mktemp("variants") / "tiny"
    cfg, flux, ae = tiny_models("tiny-variants", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return pictor.load(str(bundle), device="cpu")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def generate(capsys: pytest.CaptureFixture[str], bundle: Path, out: Path, *args: str) -> list[Path]:
    code, stdout, err = cli(capsys, "generate", *args, "--model", str(bundle), *FAST, "-o", str(out))
    assert code == 0, err
    return [Path(line) for line in stdout.split()]


def pixels(image: Path | Image.Image) -> np.ndarray:
    return np.asarray((image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB"))


def plain(pipe: Pipeline, prompt: str, seed: int, negative: str = "", n: int = 1) -> np.ndarray:
    """The last image plain `pictor generate PROMPT --seed SEED -n N` makes (one sampler run of N: a run of
    another size may round a pixel differently on the CPU, as its matrix products are blocked otherwise)."""
    request = GenerationRequest(prompt, negative, width=16, height=16, steps=2, seed=seed, num_images=n)
    return pixels(pipe.generate(request)[-1].image)


def test_all_makes_every_combination_n_times_and_reproduces(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    paths = generate(capsys, bundle, tmp_path / "out", "a {red|blue} circle", "--variants", "all", "-n", "2")
    assert len(paths) == 4  # no --seed: one random seed shared by every combination
    seed = read_record(paths[0])["seed"]
    assert [p.name for p in paths] == [f"{k:05d}-{seed + k % 2}.png" for k in range(4)]
    records = [read_record(p) for p in paths]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue circle"] * 2
    assert records[3]["prompt_template"] == {
        "variants": "all",
        "prompt": "a {red|blue} circle",
        "negative_prompt": "",
    }
    np.testing.assert_array_equal(pixels(paths[3]), plain(pipe, "a blue circle", seed, n=2))

    code, stdout, err = cli(
        capsys, "reproduce", str(paths[2]), "--device", "cpu", "-o", str(tmp_path / "again")
    )
    assert code == 0, err
    np.testing.assert_array_equal(pixels(Path(stdout.split()[0])), pixels(paths[2]))
    assert "identical" in err


def test_random_draws_from_each_seed_with_wildcards_and_negative(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    wild = tmp_path / "wild"
    (wild / "shapes").mkdir(parents=True)
    (wild / "colours.txt").write_text("# colours\nred\n{dark|light} blue\n", encoding="utf-8")
    (wild / "shapes" / "round.txt").write_text("circle\nring\n", encoding="utf-8")
    template = "a __colours__ __shapes/round__"
    args = (template, "--variants", "random", "--wildcards", str(wild), "--negative", "{green|yellow}")
    paths = generate(capsys, bundle, tmp_path / "out", *args, "-n", "4", "--seed", "10")
    assert [p.name for p in paths] == [f"{k:05d}-{10 + k}.png" for k in range(4)]
    tree = link(parse_template("a {red|{dark|light} blue} {circle|ring}"), None)
    negative = link(parse_template("{green|yellow}"), None)
    for k, path in enumerate(paths):
        record = read_record(path)
        assert record["prompt"] == pick(tree, variant_rng(10 + k))  # the seed decides the text
        assert record["negative_prompt"] == pick(negative, variant_rng(10 + k, "negative"))
        assert record["prompt_template"]["prompt"] == template
    # the draws leave the noise alone: each image is plain generate's with its texts
    last = read_record(paths[3])
    np.testing.assert_array_equal(pixels(paths[3]), plain(pipe, last["prompt"], 13, last["negative_prompt"]))


def test_from_file_runs_every_line_and_numbers_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na {big|small} square\n", encoding="utf-8")
    out = tmp_path / "out"
    first = generate(capsys, bundle, out, "--from-file", str(prompts), "-n", "2", "--seed", "3")
    assert [p.name for p in first] == ["00000-3.png", "00001-4.png", "00002-3.png", "00003-4.png"]
    assert [read_record(p)["prompt"] for p in first] == ["a red circle"] * 2 + ["a {big|small} square"] * 2
    assert "prompt_template" not in read_record(first[0])  # no --variants: the lines as written
    again = generate(capsys, bundle, out, "--from-file", str(prompts), "--variants", "all", "--seed", "3")
    assert [p.name for p in again] == ["00004-3.png", "00005-3.png", "00006-3.png"]  # numbering goes on
    assert [read_record(p)["prompt"] for p in again] == ["a red circle", "a big square", "a small square"]
    assert len(list(out.iterdir())) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--variants", "all"), "give a PROMPT or --from-file FILE"),
        (("x", "--from-file", "FILE"), "give a PROMPT or --from-file FILE"),
        (("--from-file", "EMPTY"), "has no prompts (only blank or # lines); put one prompt per line"),
        (("--from-file", "missing.txt"), "--from-file missing.txt: no such file"),
        (("a {red", "--variants", "random"), "the '{' at character 3 is never closed"),
        (("a", "--variants", "all", "--negative", "x}"), "the negative prompt 'x}': '}' at character 2"),
        (
            ("a __colours__", "--variants", "random"),
            "__colours__ is a wildcard: give the folder of colours.txt",
        ),
        (("__nope__", "--variants", "all", "--wildcards", "WILD"), "unknown wildcard __nope__"),
        (("__loop__", "--variants", "all", "--wildcards", "WILD"), "wildcard cycle: __loop__ -> __loop__"),
        (("{1|2|3|4|5|6|7|8|9|0}" * 4, "--variants", "all"), "would make 10000 prompts, more than 1000"),
        (("a", "--wildcards", "WILD"), "--wildcards is read by --variants"),
        (("a", "--variants", "random", "--best-of", "2"), "--best-of ranks candidates of one prompt"),
        # the pipeline's limits, for the whole plan: random variants run one image at a time
        (("{a|b}", "--variants", "random", "-n", "20000"), "number of images must be between 1 and 10000"),
        (("{a|b}", "--variants", "all", "-n", "0"), "number of images must be between 1 and 10000"),
        (
            ("{a|b}", "--variants", "random", "-n", "2", "--seed", str(2**63 - 1)),
            "seed must be between 0 and 9223372036854775806",
        ),
        (("{a|b}" * 2000, "--variants", "all"), "would make more than 10^15 prompts"),
        (("__w0__", "--variants", "random", "--wildcards", "FANOUT"), "can resolve to a text of"),
    ],
)
def test_refusals_are_one_line_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "loop.txt").write_text("a __loop__\n", encoding="utf-8")
    # a small folder whose texts grow fourfold with every file: w0 uses w1 four times, ...
    (tmp_path / "fanout").mkdir()
    for k in range(12):
        (tmp_path / "fanout" / f"w{k}.txt").write_text(f"__w{k + 1}__ " * 4 + "\n", encoding="utf-8")
    (tmp_path / "fanout" / "w12.txt").write_text("x\ny\n", encoding="utf-8")
    named = {
        "EMPTY": str(tmp_path / "empty.txt"),
        "WILD": str(tmp_path / "wild"),
        "FANOUT": str(tmp_path / "fanout"),
    }
    args = tuple(named.get(a, a) for a in args)
    out = tmp_path / "out"
    # no such model: a refusal that waited for the model would name it instead
    code, stdout, err = cli(capsys, "generate", *args, "--model", "no-such-model", "-o", str(out))
    assert code == 2 and stdout == ""
    assert err.startswith("pictor generate: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()  # nothing written


def test_without_variants_braces_stay(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path
) -> None:
    (path,) = generate(capsys, bundle, tmp_path / "out", "a {red|blue} __x__", "--seed", "1")
    assert read_record(path)["prompt"] == "a {red|blue} __x__"
    assert path.name == "00000-1.png"
