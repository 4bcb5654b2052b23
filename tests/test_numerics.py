"""ppo.py's masked math with garbage at padding positions, and whitening precision against a float64 reference."""

import math

import pytest
import torch
from test_ppo import gae_reference, rand_mask

import ppo


def planted(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """x with NaN, +inf and -inf written at its padding positions."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, x.shape, generator=g)]
    return torch.where(mask, x, junk)


def whiten_reference(x, mask, shift_mean=True):
    """Two passes in float64 over the real tokens, as a plain loop."""
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mean = math.fsum(vals) / len(vals)
    var = math.fsum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


def test_nan_and_inf_at_padding_never_reach_real_tokens():
    torch.manual_seed(0)
    B, T = 6, 9
    mask, lengths = rand_mask(B, T, seed=4)
    mask[0, -1] = False  # at least one padding position
    lengths[0] = int(mask[0].sum())
    logp, ref_logp, values, score = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), torch.randn(B)
    clean_rewards, clean_kl = ppo.compute_rewards(score, logp, ref_logp, mask, lengths, 0.1)
    rewards, kl = ppo.compute_rewards(score, planted(logp, mask, 1), planted(ref_logp, mask, 2), mask, lengths, 0.1)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    assert torch.equal(rewards, clean_rewards) and torch.equal(kl, clean_kl)

    adv, ret = ppo.gae(planted(rewards, mask, 3), planted(values, mask, 4), mask, 1.0, 0.95)
    ref_adv = gae_reference(rewards, values, lengths, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.allclose(adv, ref_adv, atol=1e-5)
    assert torch.allclose(ret, torch.where(mask, ref_adv + values, 0.0), atol=1e-5)

    x = planted(torch.randn(B, T), mask, 5)
    assert math.isfinite(ppo.masked_mean(x, mask).item())
    assert ppo.masked_mean(x, mask).item() == pytest.approx(x[mask].mean().item(), rel=1e-6)
    w = ppo.masked_whiten(x, mask)
    assert torch.isfinite(w).all() and (w[~mask] == 0).all()
    assert torch.allclose(w.double(), whiten_reference(x, mask), atol=1e-5)


def test_overflow_at_padding_does_not_reach_the_gradient():
    """A log-ratio of 200 nats at a padding slot overflows exp (the ratio, k3); `where` keeps it out of the loss but
    its backward multiplies 0 by inf: the losses get the mask and give the clean run's gradient."""
    torch.manual_seed(1)
    B, T = 4, 7
    mask, _ = rand_mask(B, T, seed=2)
    mask[0, -1] = False
    old, ref, adv = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    grads = []
    for pad in (0.0, -200.0):  # a quiet padding slot, then one whose old and reference log-probs are far below
        logp = torch.randn(B, T, generator=torch.Generator().manual_seed(3)).requires_grad_()
        old_p, ref_p = torch.where(mask, old, pad), torch.where(mask, ref, pad)
        pg, _, _ = ppo.policy_loss(logp, old_p, adv, 0.2, mask)
        loss = ppo.masked_sum(pg + 0.1 * ppo.kl_estimate(logp, ref_p, "k3", mask), mask)
        (grad,) = torch.autograd.grad(loss, logp)
        grads.append(grad)
    assert torch.isfinite(grads[1]).all() and torch.equal(grads[0], grads[1])
    assert (grads[1][~mask] == 0).all() and (grads[1][mask] != 0).any()


@pytest.mark.parametrize("offset", [1.0, 1e3, 1e5])
def test_whiten_nearly_constant_inputs_against_float64(offset):
    """fp32 values that differ only in their last few digits: a one-pass variance in fp32 is off by tens of
    percent here; two passes in float64 agree with the reference."""
    torch.manual_seed(1)
    B, T = 8, 16
    mask, _ = rand_mask(B, T, seed=6)
    x = (offset + offset * 1e-4 * torch.randn(B, T)).float()
    for shift in (True, False):
        got = ppo.masked_whiten(x, mask, shift_mean=shift)
        ref = whiten_reference(x, mask, shift_mean=shift)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-3 if shift else offset * 1e-6)


def test_whiten_constant_and_single_token_batches_are_finite():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = ppo.masked_whiten(torch.full((2, 3), 3.25), mask)
    assert torch.isfinite(w).all() and (w == 0).all()
    one = torch.tensor([[True, False]])
    w = ppo.masked_whiten(torch.tensor([[7.0, math.nan]]), one)
    assert torch.isfinite(w).all() and w[0, 0] == 0.0
    w = ppo.masked_whiten(torch.tensor([[7.0, math.nan]]), one, shift_mean=False)
    assert w[0, 0].item() == pytest.approx(7.0)


def test_bf16_inputs_are_whitened_in_fp32():
    mask, _ = rand_mask(4, 5, seed=7)
    x = torch.randn(4, 5).bfloat16()
    got = ppo.masked_whiten(x, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), whiten_reference(x.float(), mask), atol=1e-5)
