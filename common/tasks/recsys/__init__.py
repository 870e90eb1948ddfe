"""Federated recommender: biased matrix factorisation (or a neural variant) over ratings.

Sites are organisations holding their own users' ratings of a shared item catalogue.

Model, for user u and item bucket i (:mod:`common.deploy.keys` maps items to buckets):

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i            (mf)
    r_hat(u, i) = mu + b_u + b_i + p_u . q_i + MLP([p_u, q_i])   (neural)

trained on the squared error (r_hat - r)^2 of each rating.

What is federated and what stays: ``mu``, the item table (``q``, ``b_i``) and the MLP are
shared and averaged by the server; the user table (``p``, ``b_u``) is sized by the
site's own users, never sent, and kept in the SuperNode's state between rounds.

Privacy. The unit of privacy is **one rating**. DP-SGD clips the gradient of each rating's
loss over *all* parameters, user rows included, and noises the sum, so the user table is
itself an output of the DP mechanism and the shared update the site sends is
post-processing of it. (Training the user table without noise would let one rating move
the user's embedding freely, and through it the gradients of that user's other ratings:
the per-rating sensitivity bound would no longer hold.) Rating-level DP is **not**
user-level DP: a user with m ratings is protected with roughly m times the epsilon
(group privacy), which for MovieLens users (20 to 737 ratings) is a weak guarantee.
``dp.unit = "user"`` makes the unit one user instead: users are Poisson-sampled, each
user's summed gradient over the shared parameters is clipped as a whole, and the user
table, which only its own user's ratings reach, trains on its exact gradient at the site
(joint DP; docs/PRIVACY.md, "User-level DP").

Evaluation (per site, on its held-out ratings: each rating is held out by a keyed draw
of its own, ``data.test-fraction`` = 20% on average, :func:`common.data.ratings.held_out_mask`):
RMSE and MAE, and HR@k / NDCG@k ranking the declared catalogue plus the site's held-out
items, the user's training items *not* removed (evaluation reads no training rating, since
its sums leave the site without DP noise), with the user's held-out items as relevant.
Sites send sums and counts (not per-user values); the server combines them
(:meth:`RecsysTask.combine_metrics`); under SecAgg+ they travel inside the masked fit
vector (:meth:`RecsysTask.sum_keys`), so the server learns only their sums over sites.
Group metrics (gender, age bucket) are sent only for groups of at least
``recsys.min-group-size`` users and reported only when the combined group reaches it
too, with complementary suppression (:func:`suppressed_groups`) so that no small group
can be recovered by subtraction.

Fairness (math in :mod:`common.metrics.fairness`, design in ``docs/FAIRNESS.md``):

* per group: RMSE, MAE, NDCG@k (exact from summed group sums);
* Yao & Huang's unfairness for gender (F vs M): ``unfairness.gender.{value, absolute,
  underestimation, overestimation, non_parity}``. Non-parity is exact. The four
  item-level ones average per-item terms over (site, item) cells: each site computes the
  per-item group means from its own ratings and sends only the sum of each term over
  its items and the number of items (``yh.gender.*``); no per-item value leaves it.
  That equals the centralised metric when no item has held-out ratings at two sites,
  and is a pooled-over-sites estimate otherwise;
* popularity bias: mean popularity of the top-k recommended items (``pop_at_k``) and of
  held-out items (``pop_held_out``), and their ratio ``pop_lift``; an item's popularity is
  the share of the site's held-out users who hold it out (site-local, so sums suffice;
  held-out only, like every evaluation sum);
* catalogue coverage, a union over sites, bounded from sums: ``coverage_site_mean``
  (the sites' mean coverage, a lower bound) and ``coverage_upper`` (an upper bound).

Bias correction (``recsys.correction = "group-offset"``, docs/FAIRNESS.md): an
offset ``b[g(u), i]`` per (gender group, item bucket) added to the prediction, shared like
the item table and trained by the same per-rating loss, so DP-SGD clips and noises it
with everything else (one more lookup per rating); after every local step the table
decays by a fixed factor (``recsys.correction-lambda``), a data-independent map with no
privacy cost. The user -> group map stays at the site.
"""
