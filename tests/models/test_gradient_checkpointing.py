"""Activation checkpointing: the same outputs and gradients as without it, for full training and for LoRAs
on a frozen base (whose block inputs need no grad); inference never checkpoints."""

from __future__ import annotations

from unittest import mock

import torch

from pictor.models.lora import add_lora

from tiny_flux import make_inputs, random_flux, tiny_params


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(checkpointed: bool, lora: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = tiny_params(depth=2, guidance_embed=True)
    model = random_flux(params)
    if lora:
        model.requires_grad_(False)
        torch.manual_seed(4)
        tree = add_lora(model, "style", rank=2)
        with torch.no_grad():
            for name, p in tree.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.gradient_checkpointing = checkpointed
    out = model(**make_inputs(params))
    loss = (out**2).mean()
    loss.backward()
    return loss.detach(), _grads(model)


def test_full_training_gradients_are_the_same() -> None:
    loss, grads = _loss_and_grads(False, lora=False)
    loss_c, grads_c = _loss_and_grads(True, lora=False)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 50
    for name in grads:
        assert torch.allclose(grads[name], grads_c[name], rtol=1e-5, atol=1e-7), name


def test_lora_gradients_reach_the_adapters_inside_checkpointed_blocks() -> None:
    loss, grads = _loss_and_grads(False, lora=True)
    loss_c, grads_c = _loss_and_grads(True, lora=True)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys()
    assert sum("single_blocks.1" in n for n in grads) >= 6  # every block's adapters, not only the last
    assert all("lora_" in n for n in grads)  # the frozen base gets none
    for name in grads:
        assert torch.allclose(grads[name], grads_c[name], rtol=1e-5, atol=1e-7), name


def test_blocks_run_again_in_backward_only_when_on_and_training() -> None:
    params = tiny_params(depth=1)
    model = random_flux(params)
    model.gradient_checkpointing = True
    with mock.patch("pictor.models.flux.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as spy:
        with torch.no_grad():
            model(**make_inputs(params))
        assert spy.call_count == 0  # sampling: nothing to save, nothing to recompute
        model(**make_inputs(params)).sum().backward()
        assert spy.call_count == 2  # one double and one single block
