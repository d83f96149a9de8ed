"""AutoEncoder: diffusers AutoencoderKL parity on shared random weights, layout, API contracts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams, flux1_ae_params, kl_loss

from tiny_flux import load_benchmark_module

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TOL = 1e-4


def tiny_params(use_quant_conv: bool) -> AutoEncoderParams:
    # ch 32 keeps every width divisible by GroupNorm's 32 groups; two levels give a downsample factor of 2.
    return AutoEncoderParams(
        resolution=32,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=4,
        scale_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=use_quant_conv,
    )


# benchmarks/_ae_reference.py, shared with bench_vae_tiling.py
diffusers_config = load_benchmark_module("_ae_reference").diffusers_config


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm scales/shifts too), with fan-in scaling so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def to_diffusers(ours: AutoEncoder) -> diffusers.AutoencoderKL:
    """Convert our state dict with diffusers' own LDM converter and load it strictly."""
    sd = ours.state_dict()
    config = diffusers_config(ours.params)
    converted = convert_ldm_vae_checkpoint(dict(sd), config)
    # Every one of our tensors must be consumed exactly once (attention weights come back as views).
    assert len(converted) == len(sd)
    assert {t.data_ptr() for t in converted.values()} == {t.data_ptr() for t in sd.values()}
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


@pytest.fixture(scope="module", params=[False, True], ids=["no_quant_conv", "quant_conv"])
def pair(request: pytest.FixtureRequest) -> tuple[AutoEncoder, diffusers.AutoencoderKL]:
    torch.manual_seed(0)
    ours = AutoEncoder(tiny_params(request.param)).eval()
    randomize_(ours)
    return ours, to_diffusers(ours)


def test_params_reject_bad_widths_and_keys() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        AutoEncoderParams(32, 3, 24, 3, [1, 2], 1, 4, 1.0, 0.0)
    d = tiny_params(True).to_dict()
    with pytest.raises(ValueError, match="unknown"):
        AutoEncoderParams.from_dict({**d, "bogus": 1})


def test_params_json_round_trip() -> None:
    p = flux1_ae_params()
    assert p.downsample_factor == 8
    assert tiny_params(False).downsample_factor == 2
    back = AutoEncoderParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    # Older configs without the flag still load.
    d = p.to_dict()
    del d["use_quant_conv"]
    assert AutoEncoderParams.from_dict(d).use_quant_conv is False


def test_flux1_layout_matches_diffusers_flux_vae() -> None:
    """Full FLUX.1 config on the meta device: our keys map 1:1, with shapes, onto diffusers' FLUX VAE."""
    p = flux1_ae_params()
    with torch.device("meta"):
        ours = AutoEncoder(p)
        ref = diffusers.AutoencoderKL(**diffusers_config(p))
    sd = ours.state_dict()
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.norm2.bias",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.norm_out.weight",
    ]:
        assert key in sd, key
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in sd)
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd

    converted = convert_ldm_vae_checkpoint(dict(sd), diffusers_config(p))
    ref_sd = ref.state_dict()
    assert len(converted) == len(sd)
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)


def test_quant_conv_keys_present_when_enabled() -> None:
    sd = AutoEncoder(tiny_params(True)).state_dict()
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)


@torch.no_grad()
def test_encoder_parity(pair: tuple[AutoEncoder, diffusers.AutoencoderKL]) -> None:
    ours, ref = pair
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    mean, logvar = ours.encode_moments(x)
    dist = ref.encode(x).latent_dist
    assert mean.shape == (2, 4, 12, 8)
    assert mean.abs().max() > 0.1  # a dead network would match trivially
    assert (mean - dist.mean).abs().max() <= TOL
    assert (logvar - dist.logvar).abs().max() <= TOL
    # Sampling draws the same noise as diffusers for the same CPU seed.
    ours_z = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    ref_z = dist.sample(generator=torch.Generator().manual_seed(5))
    assert (ours_z - ours.scale_factor * (ref_z - ours.shift_factor)).abs().max() <= TOL


@torch.no_grad()
def test_decoder_parity(pair: tuple[AutoEncoder, diffusers.AutoencoderKL]) -> None:
    ours, ref = pair
    raw = torch.randn(2, 4, 10, 7, generator=torch.Generator().manual_seed(2))  # non-square
    expected = ref.decode(raw).sample
    got = ours.decode(ours.scale_factor * (raw - ours.shift_factor))
    assert got.shape == (2, 3, 20, 14)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= TOL


def test_size_and_channel_errors() -> None:
    ae = AutoEncoder(AutoEncoderParams.from_dict({**tiny_params(False).to_dict(), "ch_mult": [1, 1, 1]}))
    assert ae.params.downsample_factor == 4
    with pytest.raises(ValueError, match=r"multiples of 4.*got 18x16.*16x16 or 20x16"):
        ae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode_moments(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        ae.decode(torch.zeros(1, 3, 4, 4))


@torch.no_grad()
def test_encode_applies_scale_shift_and_seeded_sampling() -> None:
    ae = AutoEncoder(tiny_params(False)).eval()
    randomize_(ae, seed=3)
    x = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, logvar = ae.encode_moments(x)
    p = ae.params
    assert torch.allclose(ae.encode(x), p.scale_factor * (mean - p.shift_factor))
    # decode inverts exactly the transform encode applied: decode(encode(x)) == decoder(mean).
    assert torch.allclose(ae.decode(ae.encode(x)), ae.decoder(mean), atol=1e-5)

    def seeded(seed: int) -> torch.Tensor:
        return ae.encode(x, sample=True, generator=torch.Generator().manual_seed(seed))

    a, b, c = seeded(7), seeded(7), seeded(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    manual = p.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - p.shift_factor)
    assert torch.allclose(a, manual, atol=1e-6)

    # forward with the same seed reconstructs from the same sample.
    recon, fmean, flogvar = ae(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(fmean, mean) and torch.equal(flogvar, logvar)
    assert torch.allclose(recon, ae.decode(a), atol=1e-5)


def test_kl_loss_matches_closed_form_and_trains() -> None:
    mean = torch.zeros(2, 4, 3, 3)
    logvar = torch.zeros(2, 4, 3, 3)
    assert kl_loss(mean, logvar).item() == 0.0
    mean[0] = 1.0  # 0.5 * 1 per element, 36 elements, batch mean over 2 samples
    assert kl_loss(mean, logvar).item() == pytest.approx(0.5 * 36 / 2)
    assert AutoEncoder.kl_loss(mean, logvar) == kl_loss(mean, logvar)

    ae = AutoEncoder(tiny_params(True))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    recon, m, lv = ae(x, generator=torch.Generator().manual_seed(0))
    (torch.nn.functional.mse_loss(recon, x) + 1e-3 * kl_loss(m, lv)).backward()
    assert all(p.grad is not None for p in ae.parameters())
