"""Caption tag shuffle and dropout (kohya's --shuffle_caption, --keep_tokens, --caption_tag_dropout_rate)."""

from __future__ import annotations

import numpy as np
import pytest

from pictor.data.captions import augment_tags, split_tags

TAGS = [f"tag{i}" for i in range(8)]
CAPTION = "trigger, " + ",".join(f" {t} " for t in TAGS)  # uneven spacing: tags are stripped


def _rng(k: int) -> np.random.Generator:
    return np.random.default_rng([7, k])


def test_split_tags_strips_and_leaves_out_empty_ones() -> None:
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]
    assert split_tags("") == [] and split_tags("   ") == []
    assert split_tags("a photo of a cat") == ["a photo of a cat"]


def test_shuffle_is_a_permutation_that_keeps_the_first_tokens() -> None:
    outs = [augment_tags(CAPTION, _rng(k), shuffle=True, keep_tokens=2) for k in range(50)]
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["trigger", "tag0"]
        assert sorted(tags[2:]) == sorted(TAGS[1:])
    assert len(set(outs)) > 40  # 7! orders: almost every draw differs
    # keep_tokens 0: the first tag moves too.
    assert any(not augment_tags(CAPTION, _rng(k), shuffle=True).startswith("trigger") for k in range(10))


def test_same_generator_state_gives_the_same_caption_and_other_seeds_others() -> None:
    a = augment_tags(CAPTION, _rng(3), shuffle=True, tag_dropout=0.3)
    assert a == augment_tags(CAPTION, _rng(3), shuffle=True, tag_dropout=0.3)
    assert len({augment_tags(CAPTION, _rng(k), shuffle=True) for k in range(4)}) == 4


def test_dropout_rate_and_keep_tokens_never_dropped() -> None:
    n, rate = 2000, 0.25
    kept = 0
    for k in range(n):
        tags = augment_tags(CAPTION, _rng(k), keep_tokens=1, tag_dropout=rate).split(", ")
        assert tags[0] == "trigger"
        assert tags[1:] == [t for t in TAGS if t in tags[1:]]  # without shuffle the order stays
        kept += len(tags) - 1
    assert abs(kept / (n * len(TAGS)) - (1 - rate)) < 0.02
    everything_kept = augment_tags(CAPTION, _rng(0), keep_tokens=len(TAGS) + 1, tag_dropout=0.9)
    assert everything_kept == ", ".join(["trigger", *TAGS])


@pytest.mark.parametrize("caption", ["", "solo", "  solo  ", "a, b"])
def test_short_captions_are_fine(caption: str) -> None:
    out = augment_tags(caption, _rng(0), shuffle=True, keep_tokens=3, tag_dropout=0.5)
    assert out == ", ".join(split_tags(caption))  # all kept tokens: nothing to shuffle or drop
    assert augment_tags(caption, _rng(0), shuffle=True) in {caption.strip(), "b, a"}


def test_nothing_asked_leaves_the_caption_as_written() -> None:
    rng = _rng(0)
    assert augment_tags(" a ,b ", rng, keep_tokens=1) == " a ,b "
    assert rng.random() == _rng(0).random()  # and draws nothing
