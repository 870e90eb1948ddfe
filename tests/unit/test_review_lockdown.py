"""Hostile review of the issue-20 lockdown: reproductions that FAIL on the reviewed commit.

Each test states the claim it checks (docs/DEPLOYMENT.md or a module docstring) and how
the claim breaks. They are the regression tests for the fixes; do not mark them xfail
once the product code is fixed.
"""

from __future__ import annotations

import pytest


# --------------------------------------------------------------------------------------------
# Finding: the coordinator resets a site's *lifetime* privacy budget through the run config.
# DEPLOYMENT.md (site-config table, `dataset-id`): the default id is derived "from data-format,
# the resolved data-path and users-path ... never from the content or the run config, so neither
# a new record nor a new run id starts a new budget". But `data.users-path` is a run-config key,
# and a site that sets no `users-path` (every non-recommender site, and recommender sites
# without user attributes) takes the coordinator's value, which dataset_identity() then hashes.
# A VAE/GAN site never reads that file, so any string works: one fresh value per run, one fresh
# lifetime budget per run.
def _site(state_dir, run_config, budget=4.0):
    """test_site_state's lifetime site (same settings as its rotating-run-ids test), under a run config."""
    from tests.unit.test_site_state import _lifetime_site

    return _lifetime_site(state_dir, budget, run_config=run_config)


def test_the_run_config_cannot_rename_the_sites_dataset():
    from common.config import RunConfig
    from common.deploy.site_config import apply_site_overrides, dataset_identity

    node = {"partition-id": 1, "data-path": "/data/images.npz", "data-format": "npz"}
    plain = apply_site_overrides(RunConfig.from_flat({"num-sites": 3}), node)
    hostile = apply_site_overrides(RunConfig.from_flat({"num-sites": 3, "data.users-path": "/x/1"}), node)
    assert dataset_identity(hostile, node, 1) == dataset_identity(plain, node, 1)


def test_rotating_users_path_cannot_exceed_the_site_lifetime_budget(tmp_path):
    from common.tasks.base import get_state

    trained = 0
    params = None
    for i in range(1, 15):
        # A new run, as the coordinator submits it: new run id, and a users-path never used before.
        site = _site(tmp_path / "state", {"data.users-path": f"/nowhere/{i}"})
        if params is None:
            model = site.task.build_model()
            params = get_state(model, site.task.shared_keys(model))
        _, _, m = site.fit(params, {"server-round": 1, "run-id": f"run-{i}"})
        if m["status"] != "trained":
            break
        trained += 1
    # Without the users-path trick the same site stops after a handful of rounds
    # (test_site_state.test_rotating_run_ids_cannot_exceed_the_site_budget: same settings).
    assert trained < 14, f"the site trained {trained} rounds on a lifetime budget of 4"


# --------------------------------------------------------------------------------------------
# Finding: the reserved-flag check in `privfed site join` is bypassed by argparse prefixes.
# DEPLOYMENT.md section 4: "The flags that would undo the guard are refused after `--`".
# client.join compares the whole flag with _RESERVED_FLAGS, but flower-supernode's argparse
# accepts any unambiguous prefix (allow_abbrev), and the last occurrence wins. Reproduced live
# (review report): `privfed site join site.toml -- --isol subprocess` started Flower's own
# SuperExec beside the privfed supervisor; an altered app (one added line writing a marker
# file) ran at that site 7 times in a 4-round run and its updates were aggregated.
def _site_config(tmp_path):
    from common.deploy.site_config import SiteConfig

    return SiteConfig(
        site_id="clinic-a",
        partition_id=0,
        superlink="127.0.0.1:9092",
        ca_cert=str(tmp_path / "ca.pem"),
        auth_private_key=str(tmp_path / "a.key"),
        auth_public_key=str(tmp_path / "a.pub"),
        declared_size=200,
        signing_key=str(tmp_path / "a.signing.pem"),
        server_key="ab" * 32,
        approved_apps="cd" * 32,
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["--isol", "subprocess"],
        ["--isol=subprocess"],
        ["--trusted", "x=y"],
        ["--allow-runtime"],
        ["--insec"],
        ["--root-cert", "/tmp/other-ca.pem"],
        ["--superl", "evil.example:9092"],
        ["--node-conf", "epsilon-budget=1000"],
        ["--auth-supernode-priv", "/tmp/other.key"],
    ],
)
def test_an_abbreviated_reserved_flag_is_refused(tmp_path, extra):
    from client.join import supernode_command
    from common.errors import PrivfedError

    with pytest.raises(PrivfedError, match="set by `privfed site join`"):
        supernode_command(_site_config(tmp_path), extra)


def test_the_supervisor_dials_the_port_flower_supernode_parses(tmp_path):
    """`--po 9095` is flower-supernode's --port 9095, but runtime_address() reads only the full
    flag: the site's SuperExec dials 9094, i.e. another SuperNode's runtime API on a shared host."""
    from client.join import runtime_address

    assert runtime_address(["--po", "9095"]).endswith(":9095")


# --------------------------------------------------------------------------------------------
# Finding: build_fab() (used by `privfed app sign` and `privfed site approve`) is not always the
# FAB `flwr run` submits. app_approval._app_files prunes every directory its .gitignore ignores,
# but Flower filters file by file with pathspec, which honours a later negation inside an
# ignored directory (`data/` then `!data/keep.py`). The signed/approved hash then differs from
# the submitted one, and every site refuses the coordinator's genuine run.
@pytest.mark.parametrize(
    "gitignore, files",
    [
        ("data/\n!data/keep.py\n", ["client/a.py", "data/keep.py"]),
        ("data/**\n!data/keep.py\n", ["client/a.py", "data/keep.py"]),
        ("**/secret/\n!**/secret/ok.py\n", ["client/secret/ok.py"]),
    ],
)
def test_build_fab_matches_flower_with_negated_gitignore_patterns(tmp_path, gitignore, files):
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk

    from common.deploy.app_approval import build_fab

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    (app / ".gitignore").write_text(gitignore)
    for rel in files:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(f"# {rel}\n")
    assert build_fab(app) == build_fab_from_disk(app)


# --------------------------------------------------------------------------------------------
# Finding: `privfed coordinator superlink` passes the operator's whole environment to
# flower-superlink. flwr 1.41 still starts its legacy gRPC Control API when
# FLWR_INTERNAL_GRPC_CONTROL_API=1 (and the gRPC Fleet API on FLWR_INTERNAL_GRPC_FLEET_API=1),
# bound to --control-api-address, default 0.0.0.0:9093: every interface, past the proxy.
# Reproduced live: with the variable set, the SuperLink listened on *:9093 and answered a gRPC
# ListRuns holding only ca.pem, while --admin was 127.0.0.1.
def test_the_superlink_never_inherits_flowers_legacy_grpc_switches(monkeypatch, tmp_path):
    import os

    from server import coordinator

    seen = {}

    def fake_execve(path, argv, env):
        seen.update(env)
        raise SystemExit(0)

    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        coordinator._exec(["/bin/true"])
    assert not any(k.startswith("FLWR_INTERNAL_GRPC") for k in seen), "the legacy gRPC APIs would bind 0.0.0.0"


# --------------------------------------------------------------------------------------------
# Finding: pre-authentication memory exhaustion through the proxy. Node authentication happens
# in the SuperLink *after* Flower's ProtobufTranslationMiddleware has read the whole body into
# memory (`await request.body()`), and the proxy lets anyone who completes a TLS handshake
# (no client certificate, no node key) send 256 MB to any Fleet endpoint over up to 1024
# connections. Reproduced live: 4 concurrent 200 MB POSTs to /v1/fleet/push-object with no
# auth headers (each answered 400) took the SuperLink from 516 MB to 1.9 GB RSS, which it kept.
def test_the_proxy_bounds_what_an_unauthenticated_client_can_make_the_superlink_buffer(tmp_path):
    from pathlib import Path

    from common.deploy import pki
    from server import proxy

    pki.make_ca(tmp_path)
    pki.make_server_cert(tmp_path, ["localhost", "127.0.0.1"])
    text = proxy.render(
        proxy.ProxyPlan(
            listen="0.0.0.0:9092",
            superlink="127.0.0.1:9093",
            cert=Path(tmp_path / "superlink.pem"),
            key=Path(tmp_path / "superlink.key"),
            ca=Path(tmp_path / "ca.pem"),
            folder=tmp_path / "proxy",
        )
    )
    # Any one of: client certificates at the proxy, a per-address connection/rate limit, or a
    # small body limit everywhere but push-object.
    assert "ssl_verify_client on" in text or "limit_conn " in text or "limit_req " in text
