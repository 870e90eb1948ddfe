"""The VAE objective is the ELBO the docs state; its per-class sums respect vae.min-group-size."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from common.errors import ConfigError
from common.tasks import get_task
from common.tasks.vae.task import VAE, class_sums, kl_standard_normal, negative_elbo_terms
from tests.conftest import make_cfg


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


# ------------------------------------------------------------------ per-class sums a site sends


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=80), k=st.integers(1, 15))
def test_no_class_under_k_images_is_sent_and_the_withheld_ones_hold_k(labels, k):
    y = torch.tensor(labels)
    sums = class_sums(torch.rand(len(labels)), y, k)
    counts = Counter(labels)
    sent = {int(key.split(".")[1]) for key in sums if key.endswith(".n")}
    assert all(sums[f"class.{c}.n"] == counts[c] >= k for c in sent)
    withheld = sum(counts[c] for c in counts if c not in sent)
    # subtracting the sent classes from the overall sum never isolates fewer than k images
    # (or nothing per class is sent: all classes together hold fewer than k)
    assert withheld == 0 or withheld >= k or not sent
    assert sent or max(counts.values()) < k or len(counts) == 1 or sum(counts.values()) - max(counts.values()) < k
    assert set(sums) == {f"class.{c}.{s}" for c in sent for s in ("recon_sum", "n")}


def test_demo_sites_send_no_class_under_the_default_minimum():
    """8 sites of digits (the demo): every site had a class with a single validation image."""
    task = get_task("vae")(make_cfg(**{"vae.hidden-dim": 16, "vae.latent-dim": 2}))
    k = task.params.min_group_size
    assert k == 10
    model = task.build_model()
    for s in range(task.cfg.federation.num_sites):
        val = task.site_data(s)[1]
        assert val.y is not None
        m = task.evaluate(model, val)
        counts = Counter(val.y.tolist())
        sent = {key.split(".")[1] for key in m if key.startswith("class.")}
        assert all(counts[int(c)] >= k for c in sent)
        assert all(m[f"class.{c}.n"] >= k for c in sent)
        withheld = sum(v for c, v in counts.items() if str(c) not in sent)
        assert withheld == 0 or withheld >= k
        # the disparity a site reports covers the sent classes only
        assert ("recon_disparity.mean" in m) == bool(sent)
    # the server's own test split is server data: every class
    m = task.evaluate(model, task.server_test_data())
    assert all(f"class.{c}.n" in m for c in range(10))


def test_min_group_size_is_validated():
    with pytest.raises(ConfigError) as info:
        get_task("vae")(make_cfg(**{"vae.min-group-size": 0}))
    assert info.value.key == "vae.min-group-size"
