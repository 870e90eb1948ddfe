"""The recommender: keyed pseudonyms, generalised attributes, loaders, model, metrics."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.arrays import ArrayData
from common.data.ratings import (
    RatingData,
    age_bucket,
    held_out_mask,
    load_movielens,
    load_ratings_csv,
    partition_users,
    pseudonymise,
    synthetic_ratings,
    zip_region,
)
from common.deploy.keys import KeyFileError, Pseudonymizer, expected_collision_rate, load_key, write_key
from common.errors import ConfigError, DataError
from common.privacy.accounting import RoundPlan
from common.privacy.engines import FastDPStep, OpacusDPStep
from common.tasks import get_task
from tests.conftest import declared, make_cfg

KEY = bytes(range(32))
SMALL = {
    "task": "recsys",
    "num-sites": 3,
    "data.source": "synthetic",
    "data.partition": "region",
    "recsys.synthetic-users": 150,
    "recsys.synthetic-items": 60,
    "recsys.synthetic-ratings-per-user": 20,
    "recsys.num-buckets": 4096,
    "recsys.min-group-size": 5,
}


def recsys_task(**overrides):
    cfg = make_cfg(**{**SMALL, **overrides})
    return get_task("recsys")(cfg, KEY)


# ------------------------------------------------------------------ keys


def test_key_file_is_private_and_not_overwritten(tmp_path):
    p = write_key(tmp_path / "fed.key")
    assert (p.stat().st_mode & 0o777) == 0o600
    key = load_key(p)
    assert len(key) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        write_key(p)
    assert load_key(p) == key  # refused overwrite left it intact
    write_key(p, force=True)
    assert load_key(p) != key and (p.stat().st_mode & 0o777) == 0o600


def test_world_readable_or_malformed_key_is_refused_in_one_line(tmp_path):
    p = write_key(tmp_path / "fed.key")
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match=r"readable by group/others \(mode 0644\); run: chmod 600") as exc:
        load_key(p)
    assert "\n" not in str(exc.value)
    bad = tmp_path / "bad.key"
    bad.write_text("s3cret-value-that-must-not-be-echoed\n")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="is not a privfed federation key") as exc:
        load_key(bad)
    assert "s3cret" not in str(exc.value)
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "missing.key")


def test_pseudonyms_are_keyed_and_domain_separated():
    a, b = Pseudonymizer(KEY), Pseudonymizer(bytes(32))
    assert a.user("42") == a.user("42") and a.user("42") != b.user("42")
    assert a.user("42") != a.user("43")
    assert a.item_bucket("42", 2**20) == a.item_bucket("42", 2**20)
    # user "42" and item "42" are different HMAC inputs
    assert int.from_bytes(a.user("42")[:8], "big") % 2**20 != a.item_bucket("42", 2**20)
    assert "Pseudonymizer(<federation key>)" == repr(a)


def test_collision_rate_matches_its_expectation():
    pseudo = Pseudonymizer(KEY)
    items = [f"item-{i}" for i in range(400)]
    rates = []
    for buckets in (512, 4096):
        # the rate is of the declared catalogue (public), not of the rated items
        data = pseudonymise(["u"], items[:1], np.full(1, 3.0), {}, items, pseudo, buckets)
        occupied, counts = np.unique([pseudo.item_bucket(i, buckets) for i in items], return_counts=True)
        assert np.array_equal(data.catalogue, occupied)
        assert data.colliding_items == counts[counts > 1].sum()
        rates.append(data.collision_rate)
        # ~n/B expected; a loose band (the draw is one key's)
        assert abs(data.collision_rate - expected_collision_rate(400, buckets)) < 0.12
    assert rates[1] < rates[0]


# ------------------------------------------------------------ generalisation


@pytest.mark.parametrize(
    "age, bucket",
    [
        (None, "unknown"),
        (7, "<18"),
        (17, "<18"),
        (18, "18-24"),
        (24, "18-24"),
        (25, "25-34"),
        (49, "45-49"),
        (55, "50-55"),
        (56, "56+"),
        (90, "56+"),
    ],
)
def test_age_is_bucketed(age, bucket):
    assert age_bucket(age) == bucket


@pytest.mark.parametrize(
    "z, region", [("94043", "zip9"), ("01002", "zip0"), ("T8H1N", "other"), ("123", "other"), ("", "unknown")]
)
def test_zip_is_generalised_to_a_region(z, region):
    assert zip_region(z) == region


def test_nothing_raw_survives_pseudonymisation():
    users = ["alice-RAW-1", "bob-RAW-2", "alice-RAW-1"]
    items = ["film-RAW-9", "film-RAW-9", "film-RAW-8"]
    attrs = {"alice-RAW-1": ("F", 33, "94043"), "bob-RAW-2": ("M", 61, "02139")}
    pseudo = Pseudonymizer(KEY)
    data = pseudonymise(users, items, np.array([4.0, 2.0, 5.0]), attrs, [], pseudo, 1024)
    # The split draws are keyed HMAC outputs (their decimal digits may spell anything):
    # checked to be exactly those, then left out of the scan below.
    assert data.split_draw.tolist() == [pseudo.split_draw(u, i) for u, i in zip(users, items)]
    rest = {k: v for k, v in data.__dict__.items() if k != "split_draw"}
    blob = repr(rest).encode() + b"".join(np.asarray(v).tobytes() for v in rest.values() if isinstance(v, np.ndarray))
    for raw in ("RAW", "94043", "02139", "33", "61"):
        assert raw.encode() not in blob, raw
    assert data.num_users == 2 and sorted(data.attrs["age"]) == ["25-34", "56+"]
    assert sorted(data.attrs["region"]) == ["zip0", "zip9"]


# ------------------------------------------------------------------ loaders


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "is empty"),
        ("user,item\n1,2\n", "line 1: header lacks column\\(s\\) rating"),
        ("user,item,rating\n1,2,4\n1,3,five\n", "line 3: column rating is not a number"),
        ("user,item,rating\n1,2,4\n1,3,7\n", r"line 3: column rating is outside \[1, 5\]"),
        ("user,item,rating\n1,2,nan\n", "line 2: column rating is outside"),
        ("user,item,rating\n1,2\n", "line 2: expected 3 fields, got 2"),
        ("user,item,rating\n", "has a header but no ratings"),
    ],
)
def test_corrupt_csv_names_file_and_line(tmp_path, text, match):
    p = _csv(tmp_path / "ratings.csv", text)
    with pytest.raises(DataError, match=match) as exc:
        load_ratings_csv(p, Pseudonymizer(KEY), 64, (1.0, 5.0))
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)
    assert not any(v in str(exc.value) for v in ("five", "nan", " 7 ")), "the value must not be repeated"


def test_csv_with_user_attributes(tmp_path):
    p = _csv(tmp_path / "r.csv", "user,item,rating,timestamp\nu1,i1,4,1\nu1,i2,3,2\nu2,i1,5,3\n")
    u = _csv(tmp_path / "u.csv", "user,gender,age,zip\nu1,F,30,10001\nu2,M,70,9Z\n")
    data = load_ratings_csv(p, Pseudonymizer(KEY), 64, (1.0, 5.0), u)
    assert len(data.rating) == 3 and data.num_users == 2
    assert sorted(zip(data.attrs["gender"], data.attrs["age"], data.attrs["region"])) == [
        ("F", "25-34", "zip1"),
        ("M", "56+", "other"),
    ]
    bad = _csv(tmp_path / "bad.csv", "user,gender,age\nu1,F,old\n")
    with pytest.raises(DataError, match="bad.csv.*line 2: column age is not an integer"):
        load_ratings_csv(p, Pseudonymizer(KEY), 64, (1.0, 5.0), bad)


def test_movielens_loader_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="MovieLens folder not found"):
        load_movielens(tmp_path / "nope", Pseudonymizer(KEY), 64, (1, 5))
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n1\t3\tx\t5\n")
    (tmp_path / "u.user").write_text("1|30|F|other|12345\n")
    with pytest.raises(DataError, match=r"u.data': line 2: column rating is not a number"):
        load_movielens(tmp_path, Pseudonymizer(KEY), 64, (1, 5))


ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens 100K not present (never committed; see README)")
def test_movielens_100k_loads():
    data = load_movielens(ML100K, Pseudonymizer(KEY), 2**17, (1.0, 5.0))
    assert len(data.rating) == 100_000 and data.num_users == 943 and data.num_items == 1682
    assert set(data.attrs["gender"]) == {"M", "F"} and data.collision_rate < 0.05


# --------------------------------------------------------------- site split


def test_held_out_split_is_per_rating_and_independent_of_row_order():
    data = synthetic_ratings(0, 50, 40, 10, Pseudonymizer(KEY), 1 << 16)
    held = held_out_mask(data, 0.2)
    # a keyed draw per rating: 20% on average (500 ratings, sd 0.018), not a per-user quota
    assert abs(held.mean() - 0.2) < 0.06 and len(set(np.bincount(data.user[held], minlength=50))) > 1
    perm = np.random.default_rng(1).permutation(len(data.rating))
    columns = ("user", "item", "rating", "split_draw")
    shuffled = type(data)(**{**data.__dict__, **{c: getattr(data, c)[perm] for c in columns}})
    held2 = held_out_mask(shuffled, 0.2)
    pairs = lambda d, h: sorted(zip(d.user[h], d.item[h]))  # noqa: E731
    assert pairs(data, held) == pairs(shuffled, held2)


def test_region_partition_keeps_regions_whole():
    data = synthetic_ratings(0, 300, 40, 5, Pseudonymizer(KEY), 1 << 16)
    parts = partition_users(data, 4, "region", seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    owner = {}
    for site, users in enumerate(parts):
        for region in set(data.attrs["region"][users]):
            assert owner.setdefault(region, site) == site
    with pytest.raises(ConfigError, match="only 10 zip regions"):
        partition_users(data, 11, "region", seed=0)


def test_sites_hold_disjoint_users_and_private_tables():
    task = recsys_task()
    sizes = task.site_sizes()
    assert len(sizes) == 3 and sum(sizes) + sum(len(task.site_data(i)[1]) for i in range(3)) == 150 * 20
    server_model = task.build_model()
    site_model = task.build_model(0)
    assert server_model.user_emb.num_embeddings == 0
    assert site_model.user_emb.num_embeddings == task.site_data(0)[0].num_users
    shared = task.shared_keys(site_model)
    assert not any(k.startswith("user") for k in shared) and "item_emb.weight" in shared
    assert task.shared_keys(server_model) == shared  # same wire format on both sides


def test_server_side_task_cannot_read_the_data():
    task = get_task("recsys")(make_cfg(**SMALL), None)
    with pytest.raises(Exception, match="federation key"):
        task.site_data(0)


# ------------------------------------------------------------------ DP


def engine_grads(engine, task, net, batch) -> dict[str, torch.Tensor]:
    """One noiseless DP step (C = 0.5) on a copy of ``net``: the clipped, summed gradients."""
    plan = RoundPlan(
        dataset_size=len(batch.x),
        sample_rate=1.0,
        steps=1,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        delta=1e-5,
        accountant="rdp",
    )
    m = copy.deepcopy(net)
    eng = engine(m, torch.optim.SGD(m.parameters(), lr=0.0), plan)
    eng.step(task.per_sample_loss(m, batch))
    out = {n: p.grad.clone() for n, p in m.named_parameters()}
    eng.close()
    return out


@pytest.mark.parametrize(
    ("model", "scales"),
    [
        ("mf", {}),
        ("neural", {}),
        # per-table scales (issue 24): still every rating's gradient clipped as one example
        (
            "mf",
            {
                "recsys.global-scale": 0.3,
                "recsys.user-bias-scale": 2.0,
                "recsys.item-bias-scale": 3.0,
                "recsys.factor-scale": 0.5,
            },
        ),
    ],
)
def test_fast_engine_matches_opacus_on_recommenders(model, scales):
    task = recsys_task(**{"recsys.model": model, "recsys.l2": 0.05, **scales})
    train = task.site_data(0)[0]
    batch = ArrayData(train.x[:64], train.y[:64])
    torch.manual_seed(0)
    net = task.build_model(0)
    fast, ref = engine_grads(FastDPStep, task, net, batch), engine_grads(OpacusDPStep, task, net, batch)
    for name in ref:
        assert torch.allclose(fast[name], ref[name], rtol=1e-4, atol=1e-6), name
    # clipping was active for at least some ratings, or the test proves little
    full = copy.deepcopy(net)
    task.per_sample_loss(full, batch).sum().backward()
    assert sum(p.grad.norm() ** 2 for p in full.parameters()) ** 0.5 > 0.5


# ------------------------------------------------------------------ metrics


def test_combined_metrics_equal_the_pooled_computation():
    task = recsys_task()
    torch.manual_seed(0)
    site_metrics, errs = [], []
    for s in range(3):
        model = task.build_model(s)
        train, test = task.site_data(s)
        m = task.evaluate(model, test)
        site_metrics.append((len(test), m))
        with torch.no_grad():
            errs.append((model(test.x).clamp(1, 5) - test.y).numpy())
    combined = task.combine_metrics(site_metrics)
    pooled = np.concatenate(errs)
    assert combined["rmse"] == pytest.approx(math.sqrt(np.mean(pooled**2)), rel=1e-6)
    assert combined["mae"] == pytest.approx(np.mean(np.abs(pooled)), rel=1e-6)
    # not the mean of the sites' RMSEs (which is what averaging would give)
    assert combined["rmse"] != pytest.approx(np.mean([m["rmse"] for _, m in site_metrics]), rel=1e-9)
    users = sum(m["n_ranked"] for _, m in site_metrics)
    assert combined["hr_at_k"] == pytest.approx(sum(m["hits"] for _, m in site_metrics) / users)
    # group RMSE from group sums
    f_sse = sum(m.get("group.gender.F.sse", 0) for _, m in site_metrics)
    f_n = sum(m.get("group.gender.F.n", 0) for _, m in site_metrics)
    assert combined["group.gender.F.rmse"] == pytest.approx(math.sqrt(f_sse / f_n))


def _tiny_site() -> RatingData:
    # two users, catalogue of buckets 0..4; user 0 (who trained on item 0) holds out 1 and 2;
    # user 1 holds out 4. The held-out data does not say what anyone trained on.
    x = torch.tensor([[0, 1], [0, 2], [1, 4]])
    return RatingData(
        x,
        torch.tensor([4.0, 2.0, 5.0]),
        num_users=2,
        attrs={"gender": np.array(["F", "M"], dtype=object), "age": np.array(["25-34", "25-34"], dtype=object)},
        catalogue=np.arange(5),
    )


class _FixedScores(torch.nn.Module):
    """score(u, i) from a table; lets ranking metrics be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.t = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.t[x[:, 0], x[:, 1]]


def test_ranking_metrics_on_a_hand_computed_case():
    task = recsys_task(**{"recsys.top-k": 2, "recsys.min-group-size": 1})
    # user 0: item 0 (trained on, but evaluation does not know it and does not exclude it)
    # scores highest; ranking 0 > 2 > 3 > 1 > 4 -> top-2 {0, 2}: one hit at rank 2
    # user 1: ranking 0 > 4 > ... -> top-2 {0, 4}: hit at rank 2
    model = _FixedScores([[9, 1, 5, 3, 0], [5, 0, 0, 0, 4]])
    m = task.evaluate(model, _tiny_site())
    ideal0 = 1 + 1 / math.log2(3)  # two relevant items, k = 2
    assert m["hits"] == 2 and m["n_ranked"] == 2
    assert m["dcg"] == pytest.approx((1 / math.log2(3)) / ideal0 + (1 / math.log2(3)) / 1)
    # rating errors: clamp(1)=1 vs 4, clamp(5)=5 vs 2, clamp(4)=4 vs 5
    assert m["sse"] == pytest.approx(9 + 9 + 1) and m["rmse"] == pytest.approx(math.sqrt(19 / 3))


def test_small_groups_are_suppressed_at_the_site_and_after_combining():
    task = recsys_task(**{"recsys.top-k": 2, "recsys.min-group-size": 2})
    model = _FixedScores([[9, 1, 5, 3, 0], [5, 0, 0, 0, 4]])
    m = task.evaluate(model, _tiny_site())
    # gender groups have one user each: not sent; the age group has both users
    assert not any(k.startswith("group.gender") for k in m) and m["group.age.25-34.users"] == 2
    assert m["groups_suppressed"] == 2
    # two sites each with one F user: each suppresses; combined site sums that reach k are reported
    one = {
        "n_ratings": 1,
        "sse": 1,
        "sae": 1,
        "n_ranked": 1,
        "hits": 0,
        "dcg": 0,
        "group.gender.F.sse": 1.0,
        "group.gender.F.n": 1.0,
        "group.gender.F.users": 1.0,
        "group.gender.F.dcg": 0.0,
    }
    big = task.combine_metrics([(1, one), (1, one)])
    assert big["group.gender.F.users"] == 2 and "group.gender.F.rmse" in big
    small = task.combine_metrics([(1, one)])
    assert "group.gender.F.rmse" not in small and small["groups_suppressed"] == 1


def test_l2_penalty_and_config_errors():
    with pytest.raises(ConfigError, match="recsys.model"):
        recsys_task(**{"recsys.model": "svd"})
    with pytest.raises(ConfigError, match="data.partition.*region, iid"):
        make_cfg(**{**SMALL, "data.partition": "dirichlet"})
    with pytest.raises(ConfigError, match="data.source"):
        make_cfg(**{**SMALL, "data.source": "digits"})
    plain, reg = recsys_task(), recsys_task(**{"recsys.l2": 0.1})
    batch = plain.site_data(0)[0]
    torch.manual_seed(0)
    model = plain.build_model(0)
    assert torch.all(reg.per_sample_loss(model, batch) > plain.per_sample_loss(model, batch))


# --------------------------------------------------------------- the site


def _recsys_site(**kw):
    from flwr.app import Context, RecordDict

    from client.app import SiteClient

    cfg = make_cfg(**{**SMALL, "dp.noise-multiplier": 1.0, "rounds": 3, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    return SiteClient(cfg, 1, "site-1", ctx, KEY, declared=declared(cfg, 1, KEY))


def test_user_tables_stay_at_the_site_and_persist_between_rounds():
    from client.app import LOCAL_STATE_KEY
    from common.tasks.base import get_state

    site = _recsys_site()
    server_model = site.task.build_model()
    keys = site.task.shared_keys(server_model)
    params = get_state(server_model, keys)
    update, n, metrics = site.fit(params, {"server-round": 1})
    # only the shared arrays travel, shaped like the server's
    assert [u.shape for u in update] == [p.shape for p in params] and metrics["unit"] == "rating"
    kept = site.ctx.state.array_records[LOCAL_STATE_KEY].to_torch_state_dict()
    assert set(kept) == {"user_emb.weight", "user_bias.weight"}
    assert kept["user_emb.weight"].shape[0] == site.train_data.num_users
    # round 2 starts from the site's own user table, not a fresh one
    model, _ = site._model(params)
    assert torch.equal(model.user_emb.weight, kept["user_emb.weight"])
    site.fit(params, {"server-round": 2})
    after = site.ctx.state.array_records[LOCAL_STATE_KEY].to_torch_state_dict()
    assert not torch.equal(after["user_emb.weight"], kept["user_emb.weight"])  # trained (with DP noise)


def test_a_site_without_the_key_gets_one_clear_line(monkeypatch):
    from client.app import site_key
    from common.deploy.keys import KEY_ENV
    from common.errors import PrivfedError

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = make_cfg(**SMALL)
    with pytest.raises(PrivfedError, match="federation key, but this site has none.*key-file") as exc:
        site_key(cfg, {"partition-id": 0})
    assert "\n" not in str(exc.value)
    assert site_key(make_cfg(), {"partition-id": 0}) is None  # the VAE needs none


def test_site_key_comes_from_node_config_or_environment(tmp_path, monkeypatch):
    from client.app import site_key
    from common.deploy.keys import KEY_ENV

    p = write_key(tmp_path / "site.key")
    cfg = make_cfg(**SMALL)
    assert site_key(cfg, {"key-file": str(p)}) == load_key(p)
    monkeypatch.setenv(KEY_ENV, str(p))
    assert site_key(cfg, {}) == load_key(p)
    os.chmod(p, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        site_key(cfg, {})


def test_cli_keys_and_a_bad_key_file_are_one_line_errors(tmp_path, capsys):
    from simulations.cli import main

    assert main(["keys", "new", str(tmp_path / "k")]) == 0
    assert main(["keys", "new", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["simulate", "recsys-synthetic", "--key-file", str(tmp_path / "nope"), "rounds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: key file") and "not found" in err and len(err.splitlines()) == 1


@pytest.mark.gpu
def test_recommender_trains_and_evaluates_on_cuda_like_on_cpu():
    from common.privacy.plan import plan_round
    from common.privacy.training import run_local_round

    task = recsys_task(**{"dp.noise-multiplier": 1.0})
    train, test = task.site_data(0)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = task.build_model(0)
        plan = plan_round(task.cfg, len(train))
        out = run_local_round(task, model, train, plan, torch.device(device), seed=7)
        assert out.steps_taken == plan.steps
        results[device] = task.evaluate(model, test)
    # different RNG streams per device: same behaviour, not the same bits
    assert abs(results["cpu"]["rmse"] - results["cuda"]["rmse"]) < 0.3
    assert results["cuda"]["n_ranked"] == results["cpu"]["n_ranked"]


@pytest.mark.parametrize("k", [2, 5, 20, 40])
def test_withheld_groups_cannot_be_recovered_by_subtraction(k):
    """overall - reported groups = the withheld groups' sum: it must cover 0 or >= k users."""
    from common.tasks.recsys.metrics import GROUP_ATTRIBUTES, suppressed_groups

    task = recsys_task(**{"recsys.min-group-size": k})
    torch.manual_seed(0)
    results = []
    for s in range(3):
        m = task.evaluate(task.build_model(s), task.site_data(s)[1])
        results.append((1, m))
        for attr in GROUP_ATTRIBUTES:
            reported = sum(v for key, v in m.items() if key.startswith(f"group.{attr}.") and key.endswith(".users"))
            assert m["n_ranked"] - reported == 0 or m["n_ranked"] - reported >= k
    combined = task.combine_metrics(results)
    for attr in GROUP_ATTRIBUTES:
        reported = sum(v for key, v in combined.items() if key.startswith(f"group.{attr}.") and key.endswith(".users"))
        assert combined["n_ranked"] - reported == 0 or combined["n_ranked"] - reported >= k
    # the rule itself on a hand case: one group of 3 under k=10 drags the next smallest along
    assert suppressed_groups({"a": 3, "b": 8, "c": 50}, 10) == {"a", "b"}
    assert suppressed_groups({"a": 30, "b": 80}, 10) == set()
    assert suppressed_groups({"a": 3, "b": 80}, 10, withheld=12) == {"a"}


def test_a_seeded_site_repeats_exactly():
    from common.tasks.base import get_state

    updates = []
    for i in range(2):
        site = _recsys_site(**{"dp.secure-rng": False})  # seeded: what the simulation launcher sets
        torch.manual_seed(0)  # the server's initial model, as the ServerApp seeds it
        server_model = site.task.build_model()
        params = get_state(server_model, site.task.shared_keys(server_model))
        torch.manual_seed(100 + i)  # whatever else the process did with the global RNG
        update, _, _ = site.fit(params, {"server-round": 1})
        updates.append(update)
    assert all(np.array_equal(a, b) for a, b in zip(*updates))


def test_default_combine_skips_strings_and_flags():
    from common.tasks import get_task

    vae = get_task("vae")(make_cfg())
    out = vae.combine_metrics(
        [(10, {"site_id": "a", "neg_elbo": 1.0, "ok": True}), (30, {"site_id": "b", "neg_elbo": 3.0, "ok": False})]
    )
    assert out == {"neg_elbo": 2.5}


# ------------------------------------------------ per-table scales, lr schedule

SCALES = {"recsys.global-scale": 0.3, "recsys.user-bias-scale": 2.0, "recsys.item-bias-scale": 3.0}


@pytest.mark.parametrize("model", ["mf", "bias"])
def test_table_scales_start_where_scale_one_starts_and_shift_the_gradient(model):
    plain = recsys_task(**{"recsys.model": model})
    scaled = recsys_task(**{"recsys.model": model, **SCALES, "recsys.factor-scale": 0.5})
    batch = plain.site_data(0)[0]
    torch.manual_seed(0)
    a = plain.build_model(0)
    torch.manual_seed(0)
    b = scaled.build_model(0)
    # the same initial values: factors drawn at init-std / scale, mu at its midpoint / scale
    assert torch.allclose(a(batch.x), b(batch.x), atol=1e-5)
    plain.per_sample_loss(a, batch).sum().backward()
    scaled.per_sample_loss(b, batch).sum().backward()
    # d loss / d weight = scale x d loss / d value
    assert torch.allclose(b.item_bias.weight.grad, 3.0 * a.item_bias.weight.grad, atol=1e-4)
    assert torch.allclose(b.user_bias.weight.grad, 2.0 * a.user_bias.weight.grad, atol=1e-4)
    assert torch.allclose(b.global_bias.weight.grad, 0.3 * a.global_bias.weight.grad, rtol=1e-4)


@pytest.mark.parametrize("key", ["global-scale", "user-bias-scale", "item-bias-scale", "factor-scale"])
def test_a_table_scale_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"recsys.{key}"):
        recsys_task(**{f"recsys.{key}": 0.0})


def test_cosine_lr_schedule_and_its_config_error():
    from common.config.schema import lr_factor

    assert lr_factor("constant", 7, 30) == 1.0
    assert lr_factor("cosine", 1, 30) == 1.0
    assert math.isclose(lr_factor("cosine", 16, 30), 0.5)
    last = lr_factor("cosine", 30, 30)
    assert 0 < last < 0.01
    assert all(lr_factor("cosine", r + 1, 30) < lr_factor("cosine", r, 30) for r in range(1, 30))
    with pytest.raises(ConfigError, match="train.lr-schedule"):
        recsys_task(**{"train.lr-schedule": "step"})


def test_the_schedule_scales_the_rounds_learning_rate():
    from common.privacy.training import run_local_round

    task = recsys_task(**{"dp.enabled": False, "train.lr": 0.05, "train.batch-size": 64})
    train = task.site_data(0)[0]
    from common.privacy.plan import plan_round

    plan = plan_round(task.cfg, len(train))
    torch.manual_seed(0)
    base = task.build_model(0)
    moved = []
    for scale in (1.0, 0.0001):
        m = copy.deepcopy(base)
        run_local_round(task, m, train, plan, torch.device("cpu"), seed=1, lr_scale=scale)
        moved.append((m.item_bias.weight - base.item_bias.weight).abs().max().item())
    assert moved[1] < moved[0] * 0.01


# ------------------------------------------------ the synthetic generator's rating scale


def _digest(r) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in (r.user, r.item, r.rating, r.split_draw):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_synthetic_scale_defaults_keep_the_data_of_before():
    """recsys.synthetic-center / -noise / -skew at their defaults draw exactly the old data
    (the digest is the generator's output before these keys existed)."""
    pseudo = Pseudonymizer(KEY)
    old = "15d520b330b1e59160e3e9660e554ee386e3f9b3dcdbd69ab4afc93f468dfd89"
    assert _digest(synthetic_ratings(3, 120, 50, 12, pseudo, 4096)) == old
    assert _digest(synthetic_ratings(3, 120, 50, 12, pseudo, 4096, (1.0, 5.0), 3.5, 0.5, 0.0)) == old
    p = recsys_task().params
    assert (p.synthetic_center, p.synthetic_noise, p.synthetic_skew) == (3.5, 0.5, 0.0)


def test_synthetic_noise_and_skew_shape_the_histogram():
    pseudo = Pseudonymizer(KEY)

    def hist(**kw):
        v = synthetic_ratings(0, 300, 200, 40, pseudo, 4096, **kw).rating
        return np.array([(v == k).mean() for k in range(1, 6)]), float(v.mean())

    plain, _ = hist()
    noisy, _ = hist(noise=0.9)
    skewed, mean_skewed = hist(noise=0.9, skew=-10.0)
    assert noisy[0] > 2 * plain[0] and noisy[4] > plain[4]  # more 1s and 5s
    assert skewed[0] > noisy[0]  # a tail toward 1 ...
    assert abs(mean_skewed - hist(noise=0.9)[1]) < 0.05  # ... at (about) the same mean: the noise has mean 0
    assert hist(center=4.0)[1] > hist()[1] + 0.3


@pytest.mark.parametrize(
    ("key", "value"),
    [("synthetic-noise", -0.1), ("synthetic-center", 6.0), ("synthetic-skew", float("nan"))],
)
def test_synthetic_scale_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"recsys.{key}"):
        recsys_task(**{f"recsys.{key}": value})
