"""`pictor caption`: caption files for a training folder from a local image-captioning model (a tiny random
BLIP here, saved as save_pretrained writes one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.captioning import CaptionError, caption_folder, load_captioner
from pictor.cli import main
from pictor.train.data import make_dataset

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "circle", "square"]
WORDS += ["photo", "of", "the", "left", "right", "big", "small"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    (folder / "vocab.txt").unlink()
    torch.manual_seed(1)  # a draw whose captions of the test pictures are all non-empty
    # initializer_range 0.5: captions that depend on the picture (at BLIP's 0.02 every picture reads alike)
    text = {"vocab_size": len(WORDS), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text |= {"intermediate_size": 37, "max_position_embeddings": 64, "bos_token_id": 5, "pad_token_id": 0}
    text |= {"sep_token_id": 3, "eos_token_id": 3, "initializer_range": 0.5}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    vision |= {"image_size": 32, "patch_size": 8, "initializer_range": 0.5}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, initializer_range=0.5)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _pictures(root: Path, count: int = 3) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / ("sub" if i == 2 else "") / f"p{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_the_captions_are_the_models_own_decoding(blip: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor, BlipForConditionalGeneration

    pictures = [Image.open(p).convert("RGB") for p in _pictures(tmp_path)]
    captioner = load_captioner(blip)
    got = captioner(pictures, max_new_tokens=8)
    model = BlipForConditionalGeneration.from_pretrained(str(blip)).eval()
    processor = AutoProcessor.from_pretrained(str(blip))
    for picture, caption in zip(pictures, got, strict=True):  # one at a time, as transformers' docs do
        out = model.generate(**processor(images=picture, return_tensors="pt"), max_new_tokens=8)
        assert caption == processor.decode(out[0], skip_special_tokens=True).strip()
    assert len(set(got)) > 1  # the pictures differ, so do their captions
    assert captioner(pictures, max_new_tokens=8) == got  # deterministic
    prompted = captioner(pictures, max_new_tokens=8, prompt="a photo of")
    assert all(c.startswith("a photo of") for c in prompted)


def test_a_folder_gets_a_caption_file_beside_each_picture(blip: Path, tmp_path: Path) -> None:
    pictures = _pictures(tmp_path)
    (tmp_path / "p1.txt").write_text("mine\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    captioner = load_captioner(blip)
    seen: list[tuple[int, int]] = []
    report = caption_folder(
        tmp_path,
        lambda ims: captioner(ims, 8),
        prefix="sks, ",
        batch_size=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert report.written == [pictures[0], pictures[2]] and report.kept == [pictures[1]]
    assert [p.name for p, _ in report.skipped] == ["broken.png"]
    assert seen == [(2, 3), (3, 3)]
    expected = captioner([Image.open(pictures[0]).convert("RGB")], 8)[0]
    assert (tmp_path / "p0.txt").read_text() == f"sks, {expected}\n"
    assert (tmp_path / "p1.txt").read_text() == "mine\n"  # kept
    assert not (tmp_path / ".hidden" / "x.txt").exists() and not list(tmp_path.rglob(".*.tmp"))
    # training reads them as its captions
    ds = make_dataset(str(tmp_path), 16, 0)
    captions = {Path(p).name: c for p, c in zip(ds.folder.paths, ds.folder.captions, strict=True)}  # type: ignore[attr-defined]
    assert captions["p0.png"] == f"sks, {expected}" and captions["p1.png"] == "mine"
    again = caption_folder(tmp_path, lambda ims: captioner(ims, 8), overwrite=True)
    assert len(again.written) == 3 and (tmp_path / "p1.txt").read_text() != "mine\n"
    # an empty caption is no caption: reported, and no file of only the prefix
    (tmp_path / "p0.txt").unlink()
    empty = caption_folder(tmp_path, lambda ims: [""] * len(ims), prefix="sks, ")
    assert [(p.name, why) for p, why in empty.skipped if p.name == "p0.png"] == [
        ("p0.png", "the model gave it an empty caption")
    ]
    assert not (tmp_path / "p0.txt").exists()


def test_the_command_line_captions_a_folder(
    blip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pictures(tmp_path)
    assert (
        main(
            [
                "caption",
                str(tmp_path),
                "--model",
                str(blip),
                "--caption-ext",
                ".caption",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    assert "3 caption(s) written, 0 kept" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*.caption")) == ["p0.caption", "p1.caption", "p2.caption"]
    assert main(["caption", str(tmp_path), "--model", str(blip), "--caption-ext", ".caption"]) == 0
    assert "0 caption(s) written, 3 kept" in capsys.readouterr().out


def test_what_cannot_be_loaded_is_named(
    blip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CaptionError, match=r"no config\.json there"):
        load_captioner(tmp_path)
    (tmp_path / "config.json").write_text((blip / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CaptionError, match=r"no .safetensors weights there \(pictor never unpickles"):
        load_captioner(tmp_path)
    assert main(["caption", str(tmp_path), "--model", str(tmp_path)]) != 0
    assert "never unpickles" in capsys.readouterr().err
    with pytest.raises(CaptionError, match="no such folder"):
        caption_folder(tmp_path / "none", lambda ims: [])
