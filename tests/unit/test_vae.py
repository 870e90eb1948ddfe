"""The VAE objective is the ELBO the docs state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from common.tasks.vae import VAE, kl_standard_normal, negative_elbo_terms


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros(3), torch.ones(3))
    expected = kl_divergence(q, p).sum(1)
    assert torch.allclose(kl_standard_normal(mu, logvar), expected, atol=1e-6)


def test_kl_hand_computed():
    # mu = 1, sigma^2 = e (logvar = 1): KL = -1/2 (1 + 1 - 1 - e) = (e - 1) / 2
    kl = kl_standard_normal(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert math.isclose(float(kl), (math.e - 1) / 2, rel_tol=1e-6)


def test_negative_elbo_is_bernoulli_nll_plus_kl():
    torch.manual_seed(1)
    model = VAE(6, 5, 2)
    x = torch.rand(4, 6)
    gen = torch.Generator().manual_seed(7)
    recon, kl = negative_elbo_terms(model, x, gen)
    # Recompute by hand with the same noise draw.
    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    logits = model.decoder(mu + eps * torch.exp(0.5 * logvar))
    p = torch.sigmoid(logits)
    nll = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(1)
    assert torch.allclose(recon, nll, atol=1e-4)
    assert torch.allclose(kl, kl_standard_normal(mu, logvar))
    assert recon.shape == kl.shape == (4,)
    assert bool((kl >= 0).all())
    assert torch.allclose(recon, F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1))
