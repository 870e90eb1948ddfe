"""federation.ema-decay at the sites: each site evaluates the server's served average with the
same moving average of its own site-local tables (the recommender's user tables), kept beside
them, continued across a resume, never sent, and never trained from."""

from __future__ import annotations

import torch

from client.app import LOCAL_AVERAGE_PREFIX, LOCAL_STATE_KEY
from common.tasks.base import get_state
from tests.unit.test_recsys import _recsys_site

LOCAL = ("user_emb.weight", "user_bias.weight")


def _kept(site) -> dict[str, torch.Tensor]:
    return site.ctx.state.array_records[LOCAL_STATE_KEY].to_torch_state_dict()


def _params(site):
    model = site.task.build_model()
    return get_state(model, site.task.shared_keys(model))


def test_without_a_decay_the_site_keeps_no_average_and_evaluates_its_last_tables():
    site = _recsys_site()
    params = _params(site)
    site.fit(params, {"server-round": 1})
    kept = _kept(site)
    assert set(kept) == set(LOCAL)
    assert torch.equal(site._evaluated_model(params).user_bias.weight, kept["user_bias.weight"])


def test_the_site_averages_its_local_tables_with_the_decay_and_evaluates_the_average():
    site = _recsys_site(**{"ema-decay": 0.75})
    params = _params(site)
    update, _, _ = site.fit(params, {"server-round": 1})
    assert len(update) == len(params)  # the average adds nothing to the reply
    first = _kept(site)
    assert set(first) == set(LOCAL) | {LOCAL_AVERAGE_PREFIX + k for k in LOCAL}
    for k in LOCAL:  # the first trained round starts the average
        assert torch.equal(first[LOCAL_AVERAGE_PREFIX + k], first[k])
    site.fit(params, {"server-round": 2})
    second = _kept(site)
    for k in LOCAL:
        expected = 0.75 * first[k] + 0.25 * second[k]
        assert torch.allclose(second[LOCAL_AVERAGE_PREFIX + k], expected, atol=1e-7)
        assert not torch.equal(second[LOCAL_AVERAGE_PREFIX + k], second[k])
    # Evaluation sees the average; training goes on from the last values.
    assert torch.equal(site._evaluated_model(params).user_emb.weight, second[LOCAL_AVERAGE_PREFIX + "user_emb.weight"])
    trained_from, _ = site._model(params)
    assert torch.equal(trained_from.user_emb.weight, second["user_emb.weight"])
    assert not any(k.startswith(LOCAL_AVERAGE_PREFIX) for k in trained_from.state_dict())


def test_a_resumed_site_continues_its_average():
    """A resumed site loads the local record from its state file (client.state.SiteState.local,
    which holds the average beside the tables); the average goes on from it, not from scratch."""
    from flwr.app import ArrayRecord

    site = _recsys_site(**{"ema-decay": 0.5})
    params = _params(site)
    for r in (1, 2):
        site.fit(params, {"server-round": r})
    saved = _kept(site)
    resumed = _recsys_site(**{"ema-decay": 0.5})
    resumed.ctx.state.array_records[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict=saved)
    resumed.fit(params, {"server-round": 3})
    now = _kept(resumed)
    for k in LOCAL:
        expected = 0.5 * saved[LOCAL_AVERAGE_PREFIX + k] + 0.5 * now[k]
        assert torch.allclose(now[LOCAL_AVERAGE_PREFIX + k], expected, atol=1e-7)


def test_a_damaged_average_is_dropped_not_loaded_and_the_average_starts_again(caplog):
    """Hostile review: a state file's average entries of the wrong shape, NaN, or named after a
    shared table crashed evaluation (size mismatch), poisoned it for ever (NaN), or would have
    replaced the served table. Now they are dropped with one log line."""
    from flwr.app import ArrayRecord

    site = _recsys_site(**{"ema-decay": 0.5})
    params = _params(site)
    site.fit(params, {"server-round": 1})
    good = _kept(site)
    rows, dim = good["user_emb.weight"].shape
    damaged = [
        {LOCAL_AVERAGE_PREFIX + "user_emb.weight": torch.zeros(rows + 1, dim)},  # wrong shape
        {LOCAL_AVERAGE_PREFIX + "user_bias.weight": torch.full_like(good["user_bias.weight"], float("nan"))},
        {LOCAL_AVERAGE_PREFIX + "item_bias.weight": torch.zeros(site.task.params.num_buckets, 1)},  # a shared table
    ]
    for r, bad in enumerate(damaged, start=2):
        site.ctx.state.array_records[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict={**good, **bad})
        with caplog.at_level("WARNING", logger="privfed.site"):
            model = site._evaluated_model(params)
        assert "do not fit the model" in caplog.text
        caplog.clear()
        assert torch.equal(model.user_emb.weight, good["user_emb.weight"])  # the last values, not the bad average
        assert torch.equal(
            model.item_bias.weight, torch.as_tensor(params[site.task.shared_keys(model).index("item_bias.weight")])
        )
        loss, _, _ = site.evaluate(params, {"server-round": r - 1})
        assert loss == loss  # finite evaluation, no crash
        site.fit(params, {"server-round": r})
        now = _kept(site)
        for k in LOCAL:  # started again from this round's tables
            assert torch.equal(now[LOCAL_AVERAGE_PREFIX + k], now[k])
        assert set(now) == set(LOCAL) | {LOCAL_AVERAGE_PREFIX + k for k in LOCAL}
        good = now
