"""`pictor eval clip-score`: each image against the prompt it was made from, as torchmetrics' CLIPScore
scores it (a tiny random CLIPModel saved as save_pretrained writes one)."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.eval.clip_score import ClipScorer, image_prompt, run_clip_score

LETTERS = list(string.ascii_lowercase)
MAX_TOKENS = 48  # the test prompts fit (each letter is a token); the cut is tested on its own


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # every word spelled letter by letter
    vocab.update({c: i + 2 for i, c in enumerate(LETTERS)})
    vocab.update({c + "</w>": i + 2 + len(LETTERS) for i, c in enumerate(LETTERS)})
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": MAX_TOKENS, "bos_token_id": 0}
    text |= {"eos_token_id": 1, "pad_token_id": 1, "projection_dim": 16}  # each tower's, as OpenAI's configs
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8, "projection_dim": 16}
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    images = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class _Transformers4Features(torch.nn.Module):
    """torchmetrics 1.9 reads `get_image_features` / `get_text_features` as transformers 4 returned them,
    tensors; transformers 5 returns an output whose pooler_output is that tensor (the projected embedding)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: object, **kw: object) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kw)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args: object, **kw: object) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kw)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


PROMPTS = ["a red circle", "two blue squares left of a green star", "x", "the quick brown fox jumps"]


def _pictures(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(PROMPTS):
        pixels = np.random.default_rng(i).integers(0, 256, (36 + 4 * i, 48, 3), dtype=np.uint8)
        info = PngImagePlugin.PngInfo()
        if i == 0:  # pictor's record
            info.add_text("pictor", json.dumps({"prompt": prompt, "seed": 1}))
        elif i == 1:  # another tool's A1111 parameters
            info.add_text(
                "parameters", f"{prompt}\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, Seed: 1"
            )
        path = root / f"{i}.png"
        Image.fromarray(pixels).save(path, pnginfo=info)
        if i >= 2:  # a caption file beside it
            path.with_suffix(".txt").write_text(prompt + "\n")
        paths.append(path)
    return paths


def test_each_image_scores_as_torchmetrics_clip_score_scores_it(clip: Path, tmp_path: Path) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore

    paths = _pictures(tmp_path / "pictures")
    assert [image_prompt(p) for p in paths] == PROMPTS
    report = run_clip_score(tmp_path / "pictures", clip, batch_size=3)
    assert [row["prompt"] for row in report["per_image"]] == PROMPTS and report["images"] == 4
    import transformers

    def model_and_processor() -> tuple:  # torchmetrics takes a local model so
        model = _Transformers4Features(transformers.CLIPModel.from_pretrained(str(clip)))
        return model, transformers.CLIPProcessor.from_pretrained(str(clip))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = CLIPScore(model_name_or_path=model_and_processor)
    pixels = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    for image, row in zip(pixels, report["per_image"], strict=True):
        metric.reset()
        assert row["score"] == pytest.approx(float(metric(image, row["prompt"])), abs=1e-4)
    metric.reset()
    metric.update(pixels, PROMPTS)  # the folder's score: torchmetrics' over all of them
    assert report["clip_score"] == pytest.approx(float(metric.compute()), abs=1e-4)
    raw = [row["cosine_x100"] for row in report["per_image"]]
    assert len(set(raw)) == 4 and [row["score"] for row in report["per_image"]] == [max(r, 0.0) for r in raw]


def test_a_prompt_past_the_towers_length_keeps_its_end_token(clip: Path) -> None:
    scorer = ClipScorer(clip)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    words = LETTERS * 2  # one token each
    long = " ".join(words)
    cut = " ".join(words[: MAX_TOKENS - 2])  # the start and end tokens take two of the positions
    torch.testing.assert_close(scorer([image], [long]), scorer([image], [cut]))


def test_images_without_a_prompt_or_that_do_not_decode_are_reported(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pictures"
    _pictures(folder)
    Image.new("RGB", (32, 32)).save(folder / "plain.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "broken.txt").write_text("a broken picture")
    out = tmp_path / "report.json"
    assert main(["eval", "clip-score", str(folder), "--clip", str(clip), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 4
    reasons = {Path(e["path"]).name: e["reason"] for e in report["skipped"]}
    assert reasons.keys() == {"plain.png", "broken.png"} and "no prompt" in reasons["plain.png"]
    assert "CLIP score" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no image with a prompt to score"):
        run_clip_score(_empty(tmp_path), clip)


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "none"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    return folder
