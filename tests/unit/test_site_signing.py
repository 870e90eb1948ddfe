"""Issue 19 at the site: every reply signed last, strict run ids, ledger receipts checked and kept."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from client.app import ReceiptContradiction, ReceiptRefused, make_site, receipt_path
from client.mods import failure_text
from common.deploy.receipts import make_receipt
from common.deploy.signing import (
    MASKED,
    SIGNATURE,
    new_signing_key,
    public_hex,
    reply_claim,
    update_digest,
    verify,
    write_signing_key,
)
from common.errors import ConfigError
from tests.site_keys import SERVER_KEY, SERVER_PUBLIC, SITE_KEYS, site_keys

DEFAULTS = {"num-sites": 3, "dp.noise-multiplier": 1.0, "train.local-epochs": 0.2}


def _site(node=None, run_config=None, keys=True, state=None, **kw):
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "declared-size": 600, **(node or {})},
        state=state if state is not None else RecordDict(),
        run_config=run_config or {},
    )
    return make_site(DEFAULTS, ctx, **({**site_keys(), **kw} if keys else kw))


def _params(site):
    from common.tasks.base import get_state

    model = site.task.build_model()
    return get_state(model, site.task.shared_keys(model))


PUB0 = public_hex(SITE_KEYS[0])


def test_a_plain_fit_reply_is_signed_last_over_the_update_digest():
    site = _site()
    arrays, _, m = site.fit(_params(site), {"server-round": 2, "run-id": "run-1"})
    assert list(m)[-1] == SIGNATURE
    claim = reply_claim("run-1", 2, "fit", update_digest(arrays), m)
    assert verify(PUB0, claim, m[SIGNATURE])
    # Bound to every field: a changed metric, round, run, kind or update breaks it.
    assert not verify(PUB0, reply_claim("run-1", 2, "fit", update_digest(arrays), {**m, "steps": 0}), m[SIGNATURE])
    assert not verify(PUB0, reply_claim("run-1", 3, "fit", update_digest(arrays), m), m[SIGNATURE])
    assert not verify(PUB0, reply_claim("run-2", 2, "fit", update_digest(arrays), m), m[SIGNATURE])
    assert not verify(PUB0, reply_claim("run-1", 2, "evaluate", update_digest(arrays), m), m[SIGNATURE])
    arrays[0] = arrays[0] + 1
    assert not verify(PUB0, reply_claim("run-1", 2, "fit", update_digest(arrays), m), m[SIGNATURE])
    assert not verify(public_hex(SITE_KEYS[1]), claim, m[SIGNATURE])  # another site's key


def test_a_secure_fit_reply_signs_the_masked_digest():
    site = _site(run_config={"secagg.enabled": True})
    arrays, _, m = site.fit(_params(site), {"server-round": 1, "run-id": "run-1"})
    assert verify(PUB0, reply_claim("run-1", 1, "fit", MASKED, m), m[SIGNATURE])
    assert not verify(PUB0, reply_claim("run-1", 1, "fit", update_digest(arrays), m), m[SIGNATURE])


def test_an_evaluate_reply_is_signed_with_an_empty_update():
    site = _site()
    _, _, m = site.evaluate(_params(site), {"server-round": 3})
    assert list(m)[-1] == SIGNATURE
    assert verify(PUB0, reply_claim("", 3, "evaluate", "", m), m[SIGNATURE])
    tampered = {**m, "site_id": "site-1"}
    assert not verify(PUB0, reply_claim("", 3, "evaluate", "", tampered), m[SIGNATURE])


def test_a_deployed_site_needs_its_signing_key_and_the_server_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        _site(keys=False)
    assert info.value.key == "signing-key"
    pem = tmp_path / "site.pem"
    own = write_signing_key(pem)
    with pytest.raises(ConfigError) as info:
        _site({"signing-key": str(pem)}, keys=False)
    assert info.value.key == "server-key"
    with pytest.raises(ConfigError) as info:
        _site({"signing-key": str(pem), "server-key": "ab" * 31}, keys=False)
    assert info.value.key == "server-key"
    site = _site({"signing-key": str(pem), "server-key": SERVER_PUBLIC}, keys=False)
    _, _, m = site.evaluate(_params(site), {"server-round": 1})
    assert verify(public_hex(own), reply_claim("", 1, "evaluate", "", m), m[SIGNATURE])  # its own key, not the list


@pytest.mark.parametrize("run_id", ["..", "a/b", ".", "../x", "a b", "-x", 7])
def test_a_run_id_outside_the_pattern_is_refused(tmp_path, run_id):
    site = _site({"state-dir": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        site.evaluate(_params(site), {"server-round": 1, "run-id": run_id})
    assert info.value.key == "run-id"
    assert failure_text(info.value) == "site failed: ConfigError [E-CONFIG] (config key 'run-id')"
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


# ------------------------------------------------------------------ receipts
def _receipt(rows, seq, signer=SERVER_KEY, site_id="site-0", run_id="run-1", head=None):
    rows = [{"site_id": site_id, "round": i + 1, "row_hash": h} for i, h in enumerate(rows)]
    earlier = [(k, k, f"head-{k}") for k in range(1, min(seq, len(rows)))]  # the heads signed before
    return make_receipt(signer, run_id, site_id, len(rows), seq, head or f"head-{seq}", rows, earlier)


def test_a_good_receipt_is_kept_on_disk(tmp_path):
    site = _site({"state-dir": str(tmp_path)})
    good = _receipt(["a"], 1)
    site.evaluate(_params(site), {"server-round": 2, "run-id": "run-1", "receipt": good})
    kept = receipt_path(tmp_path, "run-1", "site-0")
    assert kept == tmp_path / "receipts" / "run-1" / "site-0.json" and kept.read_text() == good
    newer = _receipt(["a", "b"], 2)
    site.evaluate(_params(site), {"server-round": 3, "run-id": "run-1", "receipt": newer})
    assert kept.read_text() == newer


def test_a_receipt_with_a_bad_signature_is_refused(tmp_path):
    site = _site({"state-dir": str(tmp_path)})
    forged = _receipt(["a"], 1, signer=new_signing_key())
    with pytest.raises(ReceiptRefused) as info:
        site.evaluate(_params(site), {"server-round": 2, "run-id": "run-1", "receipt": forged})
    assert (
        failure_text(info.value)
        == "site failed: ReceiptRefused [E-RECEIPT] (the coordinator's ledger receipt does not verify)"
    )
    assert not receipt_path(tmp_path, "run-1", "site-0").exists()
    other_site = _receipt(["a"], 1, site_id="site-1")
    with pytest.raises(ReceiptRefused):
        site.evaluate(_params(site), {"server-round": 2, "run-id": "run-1", "receipt": other_site})
    tampered = json.loads(_receipt(["a"], 1))
    tampered["rows"][0]["row_hash"] = "z"
    with pytest.raises(ReceiptRefused):
        site.evaluate(_params(site), {"server-round": 2, "run-id": "run-1", "receipt": json.dumps(tampered)})


@pytest.mark.parametrize("state_dir", [True, False])
def test_a_receipt_that_does_not_extend_the_kept_one_is_refused(tmp_path, state_dir):
    state = RecordDict()  # the node state lives across messages (the receipt without a state-dir)
    node = {"state-dir": str(tmp_path)} if state_dir else {}
    site = _site(node, state=state)
    kept = _receipt(["a", "b"], 2)
    site.evaluate(_params(site), {"server-round": 3, "run-id": "run-1", "receipt": kept})
    for bad in (
        _receipt(["a", "X"], 3),  # a row it signed for earlier changed
        _receipt(["a"], 1),  # an older head
        _receipt(["a", "b"], 2, head="other"),  # two heads at one seq
    ):
        again = _site(node, state=state)  # a new message: a new SiteClient, the same node
        with pytest.raises(ReceiptContradiction) as info:
            again.evaluate(_params(again), {"server-round": 4, "run-id": "run-1", "receipt": bad})
        text = failure_text(info.value)
        assert (
            text == "site failed: ReceiptContradiction [E-RECEIPT] "
            "(the coordinator's ledger receipt contradicts an earlier one)"
        )
    if state_dir:
        assert receipt_path(tmp_path, "run-1", "site-0").read_text() == kept
