"""Prompt variants (`{a|b}`, `__wildcards__`) and prompt files: parsing, expansion, random draws and the plan
of requests `pictor generate` runs. Pure text: no model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pictor.prompt_variants import (
    MAX_COMBINATIONS,
    MAX_DEPTH,
    MAX_TEXT_SIZE,
    Choice,
    PromptRun,
    Text,
    VariantError,
    Wildcard,
    WildcardFolder,
    count_combinations,
    expand_all,
    largest_text,
    link,
    parse_template,
    pick,
    plan_runs,
    read_prompt_file,
    variant_rng,
)


def expand(text: str, folder: WildcardFolder | None = None) -> list[str]:
    return expand_all(link(parse_template(text), folder))


def wildcards(tmp_path: Path, **files: str) -> WildcardFolder:
    """A wildcard folder with these files (a `__` in a keyword's name stands for a subfolder)."""
    for name, text in files.items():
        path = tmp_path / "wild" / f"{name.replace('__', '/')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (tmp_path / "wild").mkdir(exist_ok=True)
    return WildcardFolder(tmp_path / "wild")


@pytest.mark.parametrize(
    ("template", "texts"),
    [
        ("a {red|green|blue} circle", ["a red circle", "a green circle", "a blue circle"]),
        ("{a {big|small}|the} circle", ["a big circle", "a small circle", "the circle"]),
        ("{|very }red", ["red", "very red"]),
        ("{}red", ["red"]),
        # the first choice varies slowest
        ("{a|b}{1|2}", ["a1", "a2", "b1", "b2"]),
        # escapes, and characters that are only special inside braces or next to a name
        (r"\{x\|y\} {a\}|b\|} c\\d", ["{x|y} a} c\\d", "{x|y} b| c\\d"]),
        ("a|b (word:1.2) \\( x__y __", ["a|b (word:1.2) \\( x__y __"]),
        ("{2::red|blue}", ["red", "blue"]),
        ("{0::red|blue}", ["blue"]),  # weight 0: never drawn, so not a combination either
        ("{a|a}", ["a"]),  # each text once
        ("no variants", ["no variants"]),
    ],
)
def test_expand_all(template: str, texts: list[str]) -> None:
    assert expand(template) == texts


def test_parse_tree_and_weights() -> None:
    assert parse_template("x {2::a|b}") == (
        Text("x "),
        Choice(((Text("a"),), (Text("b"),)), (2.0, 1.0)),
    )
    assert parse_template("__people/names__!") == (Wildcard("people/names"), Text("!"))
    assert parse_template("__my_colours__") == (Wildcard("my_colours"),)
    assert parse_template(r"\_\_x__") == (Text("__x__"),)  # escaped underscores are no wildcard


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a {red|green", "'{' at character 3 is never closed; add '}' or write a literal brace as \\{"),
        ("a red}", "'}' at character 6 closes no '{'; remove it or write a literal brace as \\}"),
        ("{{a}", "never closed"),
        ("{0::a|0::b}", "weighs 0"),
        ("{" * (MAX_DEPTH + 1) + "}" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH} levels"),
    ],
)
def test_parse_errors_are_one_line(template: str, message: str) -> None:
    with pytest.raises(VariantError) as info:
        parse_template(template)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("the prompt '")
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as one-line errors


def test_count_matches_expansion_and_stays_cheap() -> None:
    tree = link(parse_template("{a|b|{c|d}} {1|2|3} {|x}"), None)
    assert count_combinations(tree) == len(expand_all(tree)) == 24
    huge = link(parse_template("{0|1|2|3|4|5|6|7|8|9}" * 30), None)
    assert count_combinations(huge) == 10**15  # counted up to the ceiling, never listed


def test_pick_is_seeded_weighted_and_leaves_the_global_rng_alone() -> None:
    tree = link(parse_template("{red|green|blue} {circle|square}"), None)
    random.seed(5)
    before = random.random()
    random.seed(5)
    first = [pick(tree, variant_rng(s)) for s in range(40)]
    assert random.random() == before  # drawing variants does not touch Python's global generator
    assert first == [pick(tree, variant_rng(s)) for s in range(40)]  # a seed always gives the same text
    assert set(first) <= set(expand_all(tree)) and len(set(first)) > 3
    # the negative prompt draws from a stream of its own
    negatives = [variant_rng(s, "negative").random() for s in range(3)]
    assert [variant_rng(s).random() for s in range(3)] != negatives
    weighted = link(parse_template("{9::a|1::b|0::c}"), None)
    draws = [pick(weighted, variant_rng(s)) for s in range(400)]
    assert "c" not in draws and 300 < draws.count("a") < 395


def test_wildcards_nested_subfolders_and_comments(tmp_path: Path) -> None:
    folder = wildcards(
        tmp_path,
        colours="# colours\nred\n\n  {dark|light} __shades__  \n",
        shades="grey",
        people__names="Ann\nBo",
    )
    assert expand("a __colours__ circle", folder) == [
        "a red circle",
        "a dark grey circle",
        "a light grey circle",
    ]
    assert expand("__people/names__ and __people/names__", folder) == [
        "Ann and Ann",
        "Ann and Bo",
        "Bo and Ann",
        "Bo and Bo",
    ]
    tree = link(parse_template("__colours__"), folder)
    assert {pick(tree, variant_rng(s)) for s in range(60)} == {"red", "dark grey", "light grey"}


def test_wildcard_errors(tmp_path: Path) -> None:
    folder = wildcards(tmp_path, a="x __b__", b="{y|__a__}", empty="# nothing\n\n", bad="{open")
    with pytest.raises(VariantError, match=r"wildcard cycle: __a__ -> __b__ -> __a__"):
        link(parse_template("__a__"), folder)
    with pytest.raises(VariantError, match=r"unknown wildcard __nope__: there is no nope.txt .*it has a, b"):
        link(parse_template("__nope__"), folder)
    with pytest.raises(VariantError, match=r"empty.txt has no options"):
        link(parse_template("__empty__"), folder)
    with pytest.raises(VariantError, match=r"bad.txt line 1 '\{open': the '\{' at character 1 is never"):
        link(parse_template("__bad__"), folder)
    with pytest.raises(VariantError, match=r"__x__ is a wildcard: give the folder of x.txt with --wildcards"):
        link(parse_template("a __x__"), None)
    with pytest.raises(VariantError, match=r"without '.', '..'"):
        link(parse_template("__a/../../secret__"), folder)
    with pytest.raises(VariantError, match=r"--wildcards .*: no such folder"):
        WildcardFolder(tmp_path / "missing")


def test_too_deep_wildcards(tmp_path: Path) -> None:
    chain = {f"w{k}": f"__w{k + 1}__" for k in range(MAX_DEPTH + 5)}
    folder = wildcards(tmp_path, **chain, **{f"w{MAX_DEPTH + 5}": "end"})
    with pytest.raises(VariantError, match=rf"nest deeper than {MAX_DEPTH} levels \(through __w0__ -> "):
        link(parse_template("__w0__"), folder)
    assert expand("__w20__", folder) == ["end"]  # a shorter chain is fine


def test_read_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na red circle\n\n   \n  a blue square  \n#another\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red circle", "a blue square"]
    path.write_text("# only\n\n", encoding="utf-8")
    with pytest.raises(VariantError, match=r"prompts.txt has no prompts \(only blank or # lines\)"):
        read_prompt_file(path)
    with pytest.raises(VariantError, match=r"--from-file .*nothing.txt: no such file"):
        read_prompt_file(tmp_path / "nothing.txt")


def test_plan_without_variants_leaves_braces_alone(tmp_path: Path) -> None:
    runs = plan_runs(["a {red|blue} __x__", "b"], "n {c|d}", None, 2)
    assert [(r.prompt, r.negative_prompt, r.seed, r.num_images) for r in runs] == [
        ("a {red|blue} __x__", "n {c|d}", None, 2),
        ("b", "n {c|d}", None, 2),
    ]
    with pytest.raises(VariantError, match="--wildcards is read by --variants"):
        plan_runs(["a"], "", 1, 1, wildcards=tmp_path)


def test_plan_all_crosses_prompts_and_negatives_in_order() -> None:
    runs = plan_runs(["{a|b}", "c"], "{x|y}", 7, 3, "all")
    assert [(r.prompt, r.negative_prompt) for r in runs] == [
        ("a", "x"),
        ("a", "y"),
        ("b", "x"),
        ("b", "y"),
        ("c", "x"),
        ("c", "y"),
    ]
    assert {(r.seed, r.num_images) for r in runs} == {(7, 3)}  # each combination: -n images from --seed
    assert runs[0] == PromptRun("a", "x", 7, 3, "{a|b}", "{x|y}")


def test_plan_all_refuses_too_many() -> None:
    assert len(plan_runs(["{1|2|3|4|5|6|7|8|9|10}" * 3], "", 0, 1, "all")) == MAX_COMBINATIONS
    with pytest.raises(VariantError, match=r"--variants all would make 2000 prompts, more than 1000"):
        plan_runs(["{1|2|3|4|5|6|7|8|9|10}" * 3], "{a|b}", 0, 1, "all")
    with pytest.raises(VariantError, match=r"would make 10 prompts, more than 4"):
        plan_runs(["{a|b}", "{1|2|3|4|5|6|7|8}"], "", 0, 1, "all", max_combinations=4)


def test_plan_random_draws_per_image_seed() -> None:
    runs = plan_runs(["{red|green|blue|cyan} {circle|square}"], "{x|y}", 100, 12, "random")
    per_image = [(r.seed + i, r.prompt, r.negative_prompt) for r in runs for i in range(r.num_images)]
    assert [s for s, _, _ in per_image] == list(range(100, 112))  # every image once, in seed order
    tree = link(parse_template("{red|green|blue|cyan} {circle|square}"), None)
    negative = link(parse_template("{x|y}"), None)
    for s, prompt, neg in per_image:  # image s's texts are those its seed draws, whatever -n or the batch
        assert prompt == pick(tree, variant_rng(s))
        assert neg == pick(negative, variant_rng(s, "negative"))
    assert len({p for _, p, _ in per_image}) > 1
    # a later start gives the same texts to the same seeds
    later = plan_runs(["{red|green|blue|cyan} {circle|square}"], "{x|y}", 105, 3, "random")
    assert [(r.seed + i, r.prompt) for r in later for i in range(r.num_images)] == [
        (s, p) for s, p, _ in per_image[5:8]
    ]


def test_plan_random_merges_equal_neighbours() -> None:
    runs = plan_runs(["{same}"], "", 3, 5, "random")
    assert runs == [PromptRun("same", "", 3, 5, "{same}", "")]
    with pytest.raises(VariantError, match="-n must be at least 1"):
        plan_runs(["a"], "", 3, 0, "random")


def test_plan_checks_every_prompt_first(tmp_path: Path) -> None:
    with pytest.raises(VariantError, match=r"the prompt 'b \{': the '\{' at character 3"):
        plan_runs(["a", "b {"], "", 1, 1, "random")
    with pytest.raises(VariantError, match=r"the negative prompt 'n\}'"):
        plan_runs(["a"], "n}", 1, 1, "all")
    folder = wildcards(tmp_path, c="red")
    runs = plan_runs(["__c__ {x|y}"], "", 1, 1, "all", folder.root)
    assert [r.prompt for r in runs] == ["red x", "red y"]


def test_files_drop_a_bom_split_only_at_line_breaks_and_number_lines_as_the_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeff# my prompts\r\na red circle\u2028on a square\n\n\rtwo stars\n".encode())
    assert read_prompt_file(prompts) == ["a red circle\u2028on a square", "two stars"]
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "bad.txt").write_text("# head\n\nok\n# note\n\nbroken {\n", encoding="utf-8")
    (tmp_path / "wild" / "dir.txt").mkdir()  # a folder named like a file is no wildcard
    folder = WildcardFolder(tmp_path / "wild")
    with pytest.raises(VariantError, match=r"bad\.txt line 6 'broken \{'"):
        link(parse_template("__bad__"), folder)
    assert "dir" not in folder.known() and "bad" in folder.known()


def test_weights_that_overflow_are_refused() -> None:
    with pytest.raises(VariantError, match=r"weights of the '\{' at character 1 are too large"):
        parse_template("{" + "9" * 400 + "::a|0::b}")
    with pytest.raises(VariantError, match="too large"):
        parse_template("{" + "9" * 308 + "::a|" + "9" * 308 + "::b}")


def test_fanning_wildcards_are_refused_before_anything_is_drawn(tmp_path: Path) -> None:
    for k in range(20):
        (tmp_path / f"w{k}.txt").write_text(f"__w{k + 1}__ " * 4, encoding="utf-8")
    (tmp_path / "w20.txt").write_text("x\ny", encoding="utf-8")
    template = link(parse_template("__w0__"), WildcardFolder(tmp_path))
    # ints only: a failing assert would print the template, whose shared branches repr exponentially
    size, count = largest_text(template), count_combinations(template)
    del template
    # a line of level k: four uses of level k + 1 (1 + its size each) and three spaces (1 + 1 each), so
    # s_k = 4 s_(k+1) + 10 from s_20 = 2 ("x"), and the prompt is 1 + s_0
    assert size == (16 * 4**20 - 7) // 3 and size > MAX_TEXT_SIZE and count == 10**15  # the count capped
    for mode in ("random", "all"):
        with pytest.raises(VariantError, match=r"can resolve to a text of [\d,]+ characters and pieces"):
            plan_runs(["__w0__"], "", 7, 1, mode, tmp_path)
    small = link(parse_template("{a|bb} c"), None)
    assert largest_text(small) == max(len(t) for t in expand_all(small)) + 3  # + its 3 pieces
