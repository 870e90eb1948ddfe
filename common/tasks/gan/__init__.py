"""Conditional GAN on images, with DP on the only network that touches real data.

Quality (server side, on the quality part of the held-out test split, with a classifier
trained on its other part and never on a site's image; :mod:`common.metrics.image_quality`):
classifier-FID, train-synthetic-test-real accuracy and the class distribution of
generated images. A run whose samples are not finite, or whose samples all fall in one
class (total mode collapse), ends as a failure.

Discriminator. ``D(x, y) = w . phi(x) + b + e_y . phi(x)``: a projection discriminator
on random features ``phi(x) = relu(A x + c)``. ``A`` and ``c`` are drawn once from a fixed
seed (``gan.feature-seed``), never trained and never fitted to data, so they are
identical at every site and carry no information about anyone; only the head
(``w``, ``b`` and the class embeddings ``e``) is trained. That head has few parameters,
which is what lets DP-SGD noise stay small next to its signal. It has no BatchNorm (no
batch statistics mixing examples), and both trainable layers are ones the fast DP
engine clips exactly (``nn.Linear``, ``nn.Embedding``).

Privacy argument (unit: one image). Per local step:
  1. **D on real data (DP-SGD).** The hinge loss ``relu(1 - D(x, y))`` of each real
     example in a Poisson-sampled batch goes through :meth:`LocalSession.step`: clipped
     per example, noised, accounted. This is the only place real data is read.
  2. **D on fake data.** ``relu(1 + D(G(z, y'), y'))`` on ``batch-size`` generated images
     with random labels: a function of the current (DP) D and G and fresh noise, never
     of a real example, so it has no privacy cost (post-processing).
  3. **G.** ``-D(G(z, y'), y')`` with D fixed: again a function of D, G and noise only.
The site releases D and G; both are post-processing of the DP-SGD outputs of step 1, so
the released pair is (epsilon, delta)-DP for one image with the epsilon the ledger
records for the discriminator's steps. ``tests/unit/test_gan.py`` checks that G's training
is identical whatever the real data is, once D is held fixed.

Class-rebalanced sampling (``gan.class-target``, docs/FAIRNESS.md): the
conditioning labels of evaluated samples are drawn so that the generated classes follow a
target, uniform or the real distribution (from the sites' summed validation class
counts, classes under ``gan.min-group-size`` withheld at each site). Post-processing of
the released generator; the sites' counts are validation
data, outside epsilon like the VAE's.
"""
