"""kohya's LoRA regularisers: `--scale-weight-norms MAX` (max-norm regularisation), `--rank-dropout P` and
`--module-dropout P` (network_args rank_dropout / module_dropout), as sd-scripts' networks/lora_flux.py
has them (`LoRANetwork.apply_max_norm_regularization`, `LoRAModule.forward`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pictor.checkpoint import read_safetensors, read_safetensors_metadata
from pictor.loading import load
from pictor.lora_files import apply_lora
from pictor.models.lora import add_lora, max_norm_adapters
from pictor.models.lora_layers import LoRAAdapter, LoRALinear
from pictor.pipeline import GenerationRequest
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import TRAJECTORY_KEYS, ConfigError, TrainConfig, resume_refusal
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from tests.train.two_ranks import assert_ranks_follow_one_process, train_on_two_ranks

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def _config(base: Path, folder: Path, out: Path, **settings: object) -> TrainConfig:
    values: dict = {
        "stage": "lora",
        "out": str(out),
        "base": str(base),
        "data": str(folder),
        "image_size": SIZE,
        "batch_size": 2,
        "lora_rank": 4,
        "lora_alpha": 2.0,
        "sample_every": 0,
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
        "warmup_steps": 0,
        "lr": 1e-2,
        "max_steps": 2,
        **settings,
    }
    return TrainConfig(**values)


def _raw_adapters(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained (not EMA) adapter weights of a checkpoint."""
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _update_norms(weights: dict[str, torch.Tensor], alpha: float, rank: int) -> list[float]:
    norms = []
    for key in (k for k in weights if k.endswith("lora_A.weight")):
        down = weights[key].double()
        up = weights[key.replace("lora_A", "lora_B")].double()
        norms.append(float((up @ down * (alpha / rank)).norm()))
    return norms


# -- max-norm regularisation ------------------------------------------------------------------------------


def _kohya_max_norm(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], max_norm_value: float):  # type: ignore[no-untyped-def]
    """kohya's apply_max_norm_regularization (networks/lora_flux.py), line by line, in float64, on
    (down, up, alpha) triples; returns (keys_scaled, mean norm, max norm, the scaled pairs)."""
    keys_scaled, norms, out = 0, [], []
    for down, up, alpha in pairs:
        down, up = down.double().clone(), up.double().clone()
        dim = down.shape[0]
        scale = alpha / dim
        updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm_value / 2)
        desired = torch.clamp(norm, max=max_norm_value)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio**0.5
        if ratio != 1:
            keys_scaled += 1
            up *= sqrt_ratio
            down *= sqrt_ratio
        scalednorm = updown.norm() * ratio
        norms.append(scalednorm.item())
        out.append((down, up))
    return keys_scaled, sum(norms) / len(norms), max(norms), out


def test_max_norm_follows_kohyas_rule() -> None:
    torch.manual_seed(0)
    tree = torch.nn.Module()
    # updates far past the cap, just past it, between half of it and it, below half, and zero
    for i, (rank, alpha, size) in enumerate([(4, 4.0, 1.0), (4, 1.0, 0.3), (8, 2.0, 0.2), (2, 1.0, 0.05)]):
        adapter = LoRAAdapter(24, 16, rank, alpha)
        with torch.no_grad():
            adapter.lora_B.weight.normal_(0.0, size)
        tree.add_module(f"layer{i}", adapter)
    tree.add_module("zero", LoRAAdapter(24, 16, 4, 4.0))  # B = 0: a fresh adapter, norm 0
    pairs = [(a.lora_A.weight.detach(), a.lora_B.weight.detach(), a.alpha) for a in tree.children()]  # type: ignore[union-attr]
    before = [float(a.delta_weight().norm()) for a in tree.children()]  # type: ignore[operator]
    max_norm = 1.0
    expected = _kohya_max_norm(pairs, max_norm)
    assert 1 <= expected[0] < len(pairs)  # some scaled, some not: both branches are exercised

    scaled, mean, largest = max_norm_adapters(tree, max_norm)
    assert scaled == expected[0]
    assert mean == pytest.approx(expected[1], rel=1e-6)
    assert largest == pytest.approx(expected[2], rel=1e-6)
    for adapter, (down, up) in zip(tree.children(), expected[3], strict=True):
        assert torch.allclose(adapter.lora_A.weight.double(), down, rtol=1e-6, atol=1e-9)  # type: ignore[union-attr]
        assert torch.allclose(adapter.lora_B.weight.double(), up, rtol=1e-6, atol=1e-9)  # type: ignore[union-attr]
    after = [float(a.delta_weight().norm()) for a in tree.children()]  # type: ignore[operator]
    for b, a in zip(before, after, strict=True):
        assert a == pytest.approx(max_norm if b > max_norm else b, rel=1e-6)  # capped, or left alone
    # a second pass finds nothing left to scale
    assert max_norm_adapters(tree, max_norm)[0] == 0


def test_norms_are_capped_after_each_step_and_logged(base: Path, folder: Path, tmp_path: Path) -> None:
    cap = 2e-3
    plain_out, capped_out = tmp_path / "plain", tmp_path / "capped"
    train(_config(base, folder, plain_out))
    train(_config(base, folder, capped_out, scale_weight_norms=cap))
    plain = _update_norms(_raw_adapters(plain_out, 2), 2.0, 4)
    capped = _update_norms(_raw_adapters(capped_out, 2), 2.0, 4)
    assert max(plain) > cap  # without the option the updates outgrow the cap
    assert max(capped) <= cap * (1 + 1e-5)
    assert min(capped) > 0  # and the adapters did train

    records = read_jsonl(capped_out / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["max_norm/keys_scaled"] >= 1
        assert 0 < record["norm/avg_key_norm"] <= record["max_norm/max_key_norm"] * (1 + 1e-9)
        assert record["max_norm/max_key_norm"] <= cap * (1 + 1e-5)
    last = records[-1]
    assert last["max_norm/max_key_norm"] == pytest.approx(max(capped), rel=1e-4)
    assert last["norm/avg_key_norm"] == pytest.approx(float(np.mean(capped)), rel=1e-4)
    assert "max_norm/keys_scaled" not in read_jsonl(plain_out / "log.jsonl")[-1]

    meta = read_safetensors_metadata(capped_out / "lora.safetensors")
    assert meta["ss_scale_weight_norms"] == str(cap)
    assert json.loads(meta["pictor_training"])["scale_weight_norms"] == cap
    assert "ss_scale_weight_norms" not in read_safetensors_metadata(plain_out / "lora.safetensors")


# -- rank and module dropout ------------------------------------------------------------------------------


def _layer(rank_dropout: float = 0.0, module_dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    add_lora(model, "t", "all", rank=6, alpha=3.0, rank_dropout=rank_dropout, module_dropout=module_dropout)
    layer = model[0]
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():
        layer.adapters["t"].lora_B.weight.normal_()  # type: ignore[union-attr]
    return layer


def _parts(layer: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The base output, A x, B and the factor alpha / rank, computed by hand."""
    adapter = layer.adapters["t"]
    base = x @ layer.weight.T + layer.bias
    return base, x @ adapter.lora_A.weight.T, adapter.lora_B.weight, adapter.alpha / adapter.rank  # type: ignore[union-attr, return-value]


@pytest.mark.parametrize("shape", [(3, 5, 12), (4, 12)])  # tokens (the blocks) and vectors (modulation)
def test_rank_dropout_masks_each_samples_rank_channels(shape: tuple[int, ...]) -> None:
    p = 0.5
    layer = _layer(rank_dropout=p)
    x = torch.randn(shape)
    base, ax, up, factor = _parts(layer, x)
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        keep = (torch.rand(shape[0], 6) > p).float()  # kohya: one mask per sample over the rank
        mask = keep.view(shape[0], *([1] * (len(shape) - 2)), 6)
        expected = base + ((ax * mask) * (factor / (1 - p))) @ up.T
        assert torch.allclose(out, expected, atol=1e-5), seed
        seen.add(int(keep.sum()))
    assert len(seen) > 1  # the masks differ between draws
    layer.eval()
    assert torch.allclose(layer(x), base + (ax * factor) @ up.T, atol=1e-5)  # eval: the plain update


def test_module_dropout_leaves_the_adapter_out_of_a_forward() -> None:
    p = 0.5
    layer = _layer(module_dropout=p)
    x = torch.randn(2, 3, 12)
    base, ax, up, factor = _parts(layer, x)
    full = base + (ax * factor) @ up.T
    outcomes = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        dropped = bool(torch.rand(1) < p)  # kohya: torch.rand(1) < module_dropout skips the module
        assert torch.allclose(out, base if dropped else full, atol=1e-5), seed
        outcomes.append(dropped)
    assert any(outcomes) and not all(outcomes)


def test_both_dropouts_draw_in_kohyas_order() -> None:
    """Module dropout's draw first, then the rank mask (as LoRAModule.forward draws them)."""
    p_rank, p_module = 0.3, 0.4
    layer = _layer(rank_dropout=p_rank, module_dropout=p_module)
    x = torch.randn(3, 4, 12)
    base, ax, up, factor = _parts(layer, x)
    for seed in range(8):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        if bool(torch.rand(1) < p_module):
            expected = base
        else:
            keep = (torch.rand(3, 6) > p_rank).float().view(3, 1, 6)
            expected = base + ((ax * keep) * (factor / (1 - p_rank))) @ up.T
        assert torch.allclose(out, expected, atol=1e-5), seed


def test_neither_acts_in_eval_mode_or_without_gradients() -> None:
    plain = _layer()
    x = torch.randn(2, 3, 12)
    reference = plain(x)
    layer = _layer(rank_dropout=0.9, module_dropout=0.9)
    layer.eval()
    assert torch.equal(layer(x), reference)
    layer.train()
    with torch.no_grad():  # a preview or a pipeline: never, whatever mode a module was left in
        assert torch.equal(layer(x), reference)
    with torch.inference_mode():
        assert torch.equal(layer(x), reference)
    state = torch.get_rng_state()
    plain(x)  # without the options nothing is drawn: plain runs keep their trajectories
    assert torch.equal(torch.get_rng_state(), state)


def test_rank_dropout_keeps_the_update_on_average_module_dropout_scales_it() -> None:
    """E[mask / (1 - p)] = 1: rank dropout's mean is the plain update. kohya does not rescale module
    dropout: its mean is (1 - p) times the update."""
    x1 = torch.randn(1, 12)
    p = 0.3
    layer = _layer(rank_dropout=p)
    base, ax, up, factor = _parts(layer, x1)
    update = ((ax * factor) @ up.T).detach()
    torch.manual_seed(0)
    many = layer(x1.expand(40000, 12))  # one mask per sample: 40,000 draws at once
    mean = many.mean(0, keepdim=True) - base
    assert torch.allclose(mean, update, atol=0.03 * float(update.abs().max()))
    assert not torch.allclose(many[0:1] - base, update, atol=0.03 * float(update.abs().max()))

    layer = _layer(module_dropout=p)
    torch.manual_seed(0)
    mean = torch.stack([layer(x1) for _ in range(4000)]).mean(0) - base
    assert torch.allclose(mean, (1 - p) * update, atol=0.03 * float(update.abs().max()))


def test_a_run_trains_with_them_and_the_pipeline_never_applies_them(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    plain_out, dropped_out = tmp_path / "plain", tmp_path / "dropped"
    train(_config(base, folder, plain_out, max_steps=2))
    train(_config(base, folder, dropped_out, max_steps=2, rank_dropout=0.5, module_dropout=0.5))
    plain_losses = [r["loss"] for r in read_jsonl(plain_out / "log.jsonl")]
    dropped_losses = [r["loss"] for r in read_jsonl(dropped_out / "log.jsonl")]
    assert all(np.isfinite(dropped_losses)) and plain_losses != dropped_losses  # they act in training
    plain_file, dropped_file = plain_out / "lora.safetensors", dropped_out / "lora.safetensors"
    assert set(read_safetensors(plain_file)) == set(read_safetensors(dropped_file))  # nothing saved of them
    meta = read_safetensors_metadata(dropped_file)
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.5", "module_dropout": "0.5"}
    training = json.loads(meta["pictor_training"])
    assert (training["rank_dropout"], training["module_dropout"]) == (0.5, 0.5)
    assert "ss_network_args" not in read_safetensors_metadata(plain_file)

    pipe = load(base, device="cpu")
    name = apply_lora(pipe.transformer, dropped_file)
    request = GenerationRequest("picture 1", width=SIZE * 2, height=SIZE * 2, steps=3, seed=7)
    reference = np.asarray(pipe.generate(request)[0].image)
    # the same LoRA, its layers told to drop (and even left in training mode): the same pixels
    for module in pipe.transformer.modules():
        if isinstance(module, LoRALinear):
            module.adapters[name].rank_dropout = 0.9  # type: ignore[union-attr]
            module.adapters[name].module_dropout = 0.9  # type: ignore[union-attr]
    pipe.transformer.train()
    assert np.array_equal(np.asarray(pipe.generate(request)[0].image), reference)


def test_gradient_checkpointing_recomputes_the_same_draws(base: Path, folder: Path, tmp_path: Path) -> None:
    """A checkpointed block runs again in the backward pass: it must drop the same adapters and rank
    channels as its forward did (torch restores the RNG for it), or the gradients would be another run's."""
    extra = {"rank_dropout": 0.5, "module_dropout": 0.5, "save_every": 2}
    train(_config(base, folder, tmp_path / "plain", **extra))
    train(_config(base, folder, tmp_path / "ckpt", gradient_checkpointing=True, **extra))
    a, b = _raw_adapters(tmp_path / "plain", 2), _raw_adapters(tmp_path / "ckpt", 2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # torchrun: two processes start (about 30 s)
def test_torchrun_two_ranks_with_module_dropout_and_max_norm(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    """DDP with adapters left out of a step (no gradient there: DDP must not wait for one) and max-norm
    after each step: two ranks of batch 2 keep identical weights and log one process's losses at batch 4
    (the ranks draw their module dropout from the same seeded RNG, so they leave out the same adapters)."""
    extra = {"module_dropout": 0.5, "scale_weight_norms": 5e-3}
    single = _config(
        base, folder, tmp_path / "one", batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, **extra
    )
    train(single)
    out = tmp_path / "ddp"
    train_on_two_ranks("lora", base, folder, out, "--rank", "4", "--alpha", "2", "--module-dropout", "0.5",
                       "--scale-weight-norms", "5e-3")  # fmt: skip
    assert_ranks_follow_one_process(out, Path(single.out))
    assert all(r["max_norm/keys_scaled"] >= 1 for r in read_jsonl(out / "log.jsonl")[2:])


# -- configuration ------------------------------------------------------------------------------------------


def test_flags_config_json_resume_and_refusals(folder: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", "b", "--data", str(folder), "--out", str(tmp_path / "o")]
    argv += ["--rank-dropout", "0.25", "--module-dropout", "0.1", "--scale-weight-norms", "1.5"]
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.rank_dropout, cfg.module_dropout, cfg.scale_weight_norms) == (0.25, 0.1, 1.5)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rank_dropout": 0.2, "module_dropout": 0.3, "scale_weight_norms": 1}))
    loaded = TrainConfig.from_json(path, stage="lora", out="o")
    assert (loaded.rank_dropout, loaded.module_dropout, loaded.scale_weight_norms) == (0.2, 0.3, 1)
    defaults = TrainConfig("lora", "o")
    assert (defaults.rank_dropout, defaults.module_dropout, defaults.scale_weight_norms) == (0.0, 0.0, None)
    helptext = parser._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for flag in ("--rank-dropout", "--module-dropout", "--scale-weight-norms"):
        assert flag in helptext

    good = {"stage": "lora", "out": "o", "preset": "tiny", "lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99]}
    TrainConfig(**good, rank_dropout=0.99, module_dropout=0.0, scale_weight_norms=1e-3).validate()  # type: ignore[arg-type]
    for settings, words in (
        ({"rank_dropout": 1.0}, r"rank_dropout \(--rank-dropout\) must lie in \[0, 1\)"),
        ({"rank_dropout": -0.1}, r"--rank-dropout\) must lie"),
        ({"module_dropout": 1.0}, r"module_dropout \(--module-dropout\) must lie in \[0, 1\)"),
        ({"scale_weight_norms": 0.0}, r"--scale-weight-norms\) must be above 0"),
        ({"scale_weight_norms": -1.0}, r"--scale-weight-norms\) must be above 0"),
        (
            {"stage": "t2i", "rank_dropout": 0.1},
            "--rank-dropout: kohya's LoRA regulariser, for lora training",
        ),
        ({"stage": "layout", "scale_weight_norms": 1.0}, "--scale-weight-norms: kohya's LoRA regulariser"),
        (
            {"lora_algo": "lokr", "module_dropout": 0.1},
            "--module-dropout applies to a plain LoRA.*not to lokr",
        ),
        ({"lora_algo": "loha", "scale_weight_norms": 1.0}, "--scale-weight-norms applies to a plain LoRA"),
        ({"lora_dora": True, "rank_dropout": 0.1}, "--rank-dropout applies .*not to lora with DoRA"),
        ({"lora_dora": True, "scale_weight_norms": 1.0}, "--scale-weight-norms applies .*with DoRA"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**{**good, **settings}).validate()  # type: ignore[arg-type]

    # Resume: allowed (they change no adapter shape and no optimizer state), warned as trajectory changes
    saved = TrainConfig("lora", "o", rank_dropout=0.1, module_dropout=0.1, scale_weight_norms=1.0)
    change = {"rank_dropout": 0.2, "module_dropout": 0.0, "scale_weight_norms": None}
    assert resume_refusal(saved, change, "ckpt") is None
    assert {"rank_dropout", "module_dropout", "scale_weight_norms"} <= set(TRAJECTORY_KEYS)
