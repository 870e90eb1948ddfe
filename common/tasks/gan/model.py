"""The GAN's networks: an MLP generator and a projection discriminator on fixed random features.

Only the discriminator's head (``head``, ``embed``) is trained with DP-SGD; its feature
map is drawn from ``gan.feature-seed``, never trained and never fitted to data. The head
uses only layer types the fast DP engine clips exactly (``nn.Linear``, ``nn.Embedding``)
and nothing that mixes examples. The generator never reads real data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.tasks.gan.config import GANConfig


class Generator(nn.Module):
    """MLP generator. BatchNorm is fine here (it only ever sees generated images) and uses
    batch statistics only, so the model has no buffers to federate."""

    def __init__(self, latent_dim: int, hidden_dim: int, out_dim: int, num_classes: int, conditional: bool) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.conditional = latent_dim, num_classes, conditional
        cond = num_classes if conditional else 0
        self.net = nn.Sequential(
            nn.Linear(latent_dim + cond, hidden_dim),
            nn.BatchNorm1d(hidden_dim, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(len(labels), self.latent_dim, generator=generator, device=labels.device)
        if self.conditional:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        return torch.sigmoid(self.net(z))


class Discriminator(nn.Module):
    """Projection discriminator on fixed random features (see the module docstring)."""

    def __init__(self, in_dim: int, features: int, num_classes: int, conditional: bool, seed: int) -> None:
        super().__init__()
        self.features = nn.Linear(in_dim, features)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.features.weight.copy_(torch.randn(features, in_dim, generator=g) / math.sqrt(in_dim))
            self.features.bias.copy_(torch.rand(features, generator=g) * 0.5 - 0.25)
        self.features.requires_grad_(False)
        self.scale = 4.0 / math.sqrt(features)
        self.head = nn.Linear(features, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.embed = nn.Embedding(num_classes, features) if conditional else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)
        # A per-label offset subtracted from the features (gan.center-samples): the mean
        # features of generated images, set by the task from G before each DP step, so a
        # real image's gradient is its distance from the generator's class mean. A plain
        # attribute, not a buffer: never in the state_dict (never federated, nothing for
        # DP-SGD to noise) and never computed from real data. None: no offset.
        self.center: torch.Tensor | None = None

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed random features, scaled (not centred)."""
        return F.relu(self.features(x)) * self.scale

    @torch.no_grad()
    def set_center(self, fake: torch.Tensor, labels: torch.Tensor) -> None:
        """Center on the mean features of generated images ``fake`` per label (a label
        without samples keeps offset 0). Data-independent: only ever called on G's output."""
        f = self.phi(fake)
        rows = self.embed.num_embeddings if self.embed is not None else 1
        sums = torch.zeros(rows, f.shape[1], device=f.device, dtype=f.dtype).index_add_(0, labels, f)
        counts = torch.zeros(rows, device=f.device, dtype=f.dtype).index_add_(0, labels, torch.ones_like(f[:, 0]))
        self.center = sums / counts.clamp(min=1).unsqueeze(1)

    def clear_center(self) -> None:
        self.center = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = self.phi(x)
        if self.center is not None:
            f = f - self.center[labels]
        out = self.head(f).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * f).sum(1)
        return out


class GAN(nn.Module):
    def __init__(self, in_dim: int, p: GANConfig) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, p.num_classes
        self.generator = Generator(p.latent_dim, p.hidden_dim, in_dim, p.num_classes, p.conditional)
        self.discriminator = Discriminator(in_dim, p.features, p.num_classes, p.conditional, p.feature_seed)
