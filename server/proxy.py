"""The sites' door to the SuperLink: an nginx reverse proxy that passes the Fleet API only.

Why a proxy: in flwr 1.41 one SuperLink port serves three HTTP APIs, told apart by path:
the Fleet API (``/v1/fleet/…``, what SuperNodes call), the Control API (``/v1/control/…``:
``flwr run``, ``flwr ls``, ``flwr supernode register``) and the runtime API its own
ServerApp and SuperExec processes use. The Control API's login plugin is a no-op without
account authentication (OIDC), so anyone who can reach that port and holds the CA
certificate (every site does) could register a node or submit an app that every site then
runs. Flower has no switch to serve the Control API on a second address. So the SuperLink
listens on loopback only, where the coordinator's own ``flwr`` CLI reaches it, and the sites
reach a proxy that forwards the Fleet paths, and nothing else, to it.

nginx is the proxy because it is packaged and security-maintained by Debian
(``apt-get install nginx-light``), operators know it, and path-based allow-listing, TLS
termination and ``nginx -s reload`` for certificate rotation are what it does every day.
The config is rendered here, not hand-written by the operator, so the deployment guide,
the deployment test and a real coordinator run the same file.

The proxy terminates the sites' TLS with the SuperLink's certificate, and dials the
SuperLink over TLS again, verifying it against the federation CA: the hop on loopback is
encrypted and authenticated too. Node authentication is end to end: a SuperNode signs
each Fleet request in its headers, which nginx forwards unchanged, and the SuperLink
checks them against the registered keys.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.deploy.fileio import write_new_file
from common.errors import PrivfedError

# The only paths a site may call. Every other path (the Control API, the runtime API, docs)
# gets 403 at the proxy and never reaches the SuperLink.
FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
# Body bounds: Flower sends a model in chunks of at most 5 MB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE),
# one per push-object request; every other Fleet request is a small message.
MAX_CHUNK_BODY = "16m"
MAX_MESSAGE_BODY = "2m"
MAX_CONNECTIONS = 16
RATE, BURST = "100r/s", 500
CONFIG_NAME = "nginx.conf"


class ProxyError(PrivfedError):
    """The proxy cannot be configured or started; the message names the file or flag."""


@dataclass(frozen=True)
class ProxyPlan:
    """Where the proxy listens, where the SuperLink is, and the files it needs."""

    listen: str  # host:port the sites dial
    superlink: str  # host:port of the SuperLink on loopback (the admin address)
    cert: Path  # the SuperLink certificate (its SANs name what the sites dial)
    key: Path
    ca: Path  # verifies the SuperLink on the loopback hop
    folder: Path  # nginx's prefix: config, pid, logs, temp files


def _upstream_name(cert: Path) -> str:
    """The name nginx checks the SuperLink's certificate against on the loopback hop: the
    certificate's first DNS SAN (an IP SAN works too, nginx checks it the same way)."""
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        raise ProxyError(f"certificate file '{cert}': not a readable PEM certificate (--cert)") from None
    try:
        sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ProxyError(f"certificate file '{cert}': has no subject alternative names") from None
    names = [str(n) for n in sans.get_values_for_type(x509.DNSName)] + [
        str(a) for a in sans.get_values_for_type(x509.IPAddress)
    ]
    if not names:
        raise ProxyError(f"certificate file '{cert}': has no DNS or IP subject alternative name")
    return "localhost" if "localhost" in names else names[0]


def _split(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProxyError(f"{flag}: expected host:port, e.g. 0.0.0.0:9092")
    return host, int(port)


# The proxying every Fleet location shares (one copy, formatted into each).
_FLEET_PASS = """            # nginx matches locations on the decoded, dot-segment-merged path but forwards
            # the raw one: a raw path that is not exactly /v1/fleet/<endpoint> (dot segments,
            # %-escapes, a query) is refused, so the SuperLink routes exactly what matched here.
            if ($request_uri !~ "^/v1/fleet/[a-z][a-z-]*$") {{
                return 403;
            }}
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            # Stream both ways, never to temp files: an update is not written to the
            # coordinator's disk by the proxy, and nginx's workers need no writable folder.
            proxy_request_buffering off;
            proxy_buffering off;"""


def render(plan: ProxyPlan) -> str:
    """nginx.conf for ``plan``: Fleet API and health to the SuperLink, 403 for everything else."""
    listen_host, listen_port = _split(plan.listen, "--listen")
    up_host, up_port = _split(plan.superlink, "--superlink")
    if up_host not in ("127.0.0.1", "::1", "localhost", "[::1]"):
        # The Control API answers on the SuperLink's port: it must not face the network.
        raise ProxyError("--superlink: the SuperLink must listen on loopback (127.0.0.1) behind the proxy")
    name = _upstream_name(plan.cert)
    f = plan.folder
    listen = f"[{listen_host.strip('[]')}]:{listen_port}" if ":" in listen_host.strip("[]") else plan.listen
    upstream = f"[{up_host.strip('[]')}]:{up_port}" if ":" in up_host.strip("[]") else plan.superlink
    fleet = _FLEET_PASS.format(ca=plan.ca, name=name)
    return f"""# Rendered by `privfed coordinator proxy` (server/proxy.py). Sites reach the Fleet API only.
worker_processes 1;
pid {f / "nginx.pid"};
error_log {f / "error.log"} warn;
events {{ worker_connections 1024; }}

http {{
    # rt: the request's time at the proxy; urt: the part spent waiting for the SuperLink.
    # Their difference is what the proxy adds (simulations/bench_proxy.py reads it).
    log_format timed '$remote_addr [$time_local] "$request" $status $request_length $bytes_sent '
                     'rt=$request_time urt=$upstream_response_time';
    access_log {f / "access.log"} timed;
    client_body_temp_path {f / "tmp-body"};
    proxy_temp_path {f / "tmp-proxy"};
    fastcgi_temp_path {f / "tmp-fastcgi"};
    uwsgi_temp_path {f / "tmp-uwsgi"};
    scgi_temp_path {f / "tmp-scgi"};
    server_tokens off;

    # Per client address: a site needs a few connections and, while it ships a model, a
    # few dozen requests a second; 429 beyond that.
    limit_conn_zone $binary_remote_addr zone=per_address:10m;
    limit_req_zone $binary_remote_addr zone=fleet_rate:10m rate={RATE};
    limit_conn_status 429;
    limit_req_status 429;

    upstream superlink {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {plan.cert};
        ssl_certificate_key {plan.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        limit_conn per_address {MAX_CONNECTIONS};
        limit_req zone=fleet_rate burst={BURST} nodelay;

        # The Fleet API: what SuperNodes call. Every request carries the node's signature
        # headers, forwarded unchanged; the SuperLink checks them against registered keys.
        # push-object carries one chunk of a model (Flower splits arrays at 5 MB); every other
        # endpoint a small message. The SuperLink reads a whole body before it checks the
        # node's signature, so these bounds, and the per-address limits above, are what an
        # unauthenticated client can make it hold.
        location = {FLEET_PREFIX}push-object {{
            client_max_body_size {MAX_CHUNK_BODY};
{fleet}
        }}
        location {FLEET_PREFIX} {{
            client_max_body_size {MAX_MESSAGE_BODY};
{fleet}
        }}

        location = {HEALTH_PATH} {{
            limit_except GET {{ deny all; }}
            proxy_pass https://superlink;
            proxy_ssl_trusted_certificate {plan.ca};
            proxy_ssl_verify on;
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
        }}

        # The Control API (flwr run / ls / supernode register) and the runtime API: never from a site.
        location / {{
            # 403 whatever the body's size (an app submitted by `flwr run` is megabytes): the
            # refusal is not read into memory, and it names the reason, not the size.
            client_max_body_size 0;
            return 403;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx executable, or a one-line error saying how to install Debian's."""
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
    if exe is None:
        raise ProxyError("nginx not found: install Debian's package (apt-get install nginx-light)")
    return exe


def command(folder: Path) -> list[str]:
    """The foreground nginx command for the proxy in ``folder``."""
    return [nginx_binary(), "-p", str(folder), "-c", str(folder / CONFIG_NAME), "-g", "daemon off;"]


def reload_command(folder: Path) -> list[str]:
    """``nginx -s reload`` for the proxy in ``folder``: picks up a rotated certificate."""
    return [nginx_binary(), "-p", str(folder), "-c", str(folder / CONFIG_NAME), "-s", "reload"]


def write(plan: ProxyPlan, force: bool = False) -> Path:
    """Write the proxy's folder (mode 0700) and config (0600), then ``nginx -t`` it."""
    for label, path in (("--cert", plan.cert), ("--key", plan.key), ("--ca-cert", plan.ca)):
        if not path.is_file():
            raise ProxyError(f"{label} file '{path}': not found")
    text = render(plan)
    plan.folder.mkdir(parents=True, exist_ok=True)
    plan.folder.chmod(0o700)
    path = plan.folder / CONFIG_NAME
    if path.is_file() and path.read_text() == text:
        force = True  # the same config again (a restart): nothing to protect
    try:
        write_new_file(path, text.encode(), 0o600, force=force)
    except FileExistsError:
        raise ProxyError(f"proxy config '{path}': already exists (pass --force to replace it)") from None
    test = subprocess.run([*command(plan.folder)[:5], "-t"], capture_output=True, text=True)
    if test.returncode != 0:
        lines = [ln for ln in test.stderr.splitlines() if "emerg" in ln or "failed" in ln]
        raise ProxyError(f"proxy config '{path}': nginx -t refused it ({(lines or ['no reason given'])[0]})")
    return path
