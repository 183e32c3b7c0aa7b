"""npm fluent-logger 3.4.1 with ``security`` and TLS against a real ``fluentforward serve``.

The client (``tests/interop/node/send.js``) runs the Forward handshake when ``security.clientHostname``
and ``security.sharedKey`` are set, and adds ``username``/password digest when the server's HELO asks
for user authentication; ``tls: true`` with ``tlsOptions.caFile`` wraps the connection in TLS. With
``requireAckResponse`` send.js exits 0 only after every chunk was acked, so the records must already be
in the spool; when the server refuses, send.js must exit 1 and the spool must hold none of them.

Three servers run for the whole module: shared key only, shared key with users, and TLS with a shared
key (the recommended production setting). Each may log only the refusals the tests provoke.
Needs ``node`` on PATH (else skipped) and ``make node`` (else failed with that advice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.interop import COMPLAINT_LEVELS, by_tag, spool_cat
from tests.interop.test_fluent_logger_node import NODE, _require_node_modules, send_js
from tests.procs import ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE is None, reason="node is not on PATH; the npm fluent-logger interop needs Node.js"
    ),
]

SHARED_KEY = "node-interop-key-4e1b"
SERVER_NAME = "ff-server.test"
CLIENT_NAME = "node-client.test"
USERS = {"alice": "alice-pw-2b7c", "bob": "bob-pw-9d3e"}
# A plain client waits for HELO while the TLS server waits for a ClientHello: the server's handshake
# timeout ends it. Short, so that test takes seconds; send.js gives up after SEND_TIMEOUT_MS anyway.
TLS_HANDSHAKE_TIMEOUT = "1s"
SEND_TIMEOUT_MS = 8000

T0 = 1_795_680_000
EVENTS = [
    {"time": T0, "record": {"log": "first", "n": 1}},
    {"time": T0 + 1, "record": {"log": "second", "n": 2, "nested": {"k": "v"}}},
    {"time": T0 + 2, "record": {"log": "third ✓", "n": 3}},
]
EXPECTED = [(event["time"] * 10**9, event["record"]) for event in EVENTS]
# Server log events a refusal may cause; anything else at warning level or above fails the module.
REFUSAL_EVENTS = frozenset({"handshake_failed", "tls_handshake_failed"})


@contextlib.contextmanager
def security_server(directory: Path, *args: str) -> Iterator[ServerProcess]:
    """Run ``fluentforward serve ARGS``; on exit, fail if it complained of anything but a refusal."""
    server = ServerProcess(directory / "spool", *args).start()
    try:
        yield server
    finally:
        code = server.stop()
    complaints = [
        event
        for event in server.events()
        if event.get("level") in COMPLAINT_LEVELS and event.get("event") not in REFUSAL_EVENTS
    ]
    assert complaints == [], f"the server complained: {complaints}"
    assert code == 0, f"the server exited with {code}"


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """The shared-key file, the users file and the TLS files (CA, server certificate and key)."""
    _require_node_modules()
    directory = tmp_path_factory.mktemp("node-security")
    (directory / "shared_key").write_text(SHARED_KEY + "\n")
    (directory / "users").write_text("".join(f"{name}:{pw}\n" for name, pw in USERS.items()))
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    return directory


def _server_fixture(*args: str):
    """A module-scoped server fixture; ``{dir}`` in ``args`` becomes the secrets directory."""

    @pytest.fixture(scope="module")
    def fixture(secrets_dir, tmp_path_factory):
        resolved = [arg.format(dir=secrets_dir) for arg in args]
        with security_server(tmp_path_factory.mktemp("server"), *resolved) as server:
            yield server

    return fixture


KEY_ARGS = ("--shared-key-file", "{dir}/shared_key", "--self-hostname", SERVER_NAME)
keyed = _server_fixture(*KEY_ARGS)
with_users = _server_fixture(*KEY_ARGS, "--users-file", "{dir}/users")
tls_keyed = _server_fixture(
    *KEY_ARGS,
    "--tls-cert",
    "{dir}/server.pem",
    "--tls-key",
    "{dir}/server.key",
    "--handshake-timeout",
    TLS_HANDSHAKE_TIMEOUT,
)


def security(**overrides: str | None) -> dict[str, str]:
    """FluentSender ``security`` options: our client name and the right key unless overridden."""
    options = {"clientHostname": CLIENT_NAME, "sharedKey": SHARED_KEY, **overrides}
    return {name: value for name, value in options.items() if value is not None}


def run(tmp_path, server, tag, **options):
    """Send EVENTS with acks; returns send.js's result and the records the spool holds for ``tag``."""
    result = send_js(
        tmp_path, server.port, tag, EVENTS, requireAckResponse=True, timeoutMs=SEND_TIMEOUT_MS, **options
    )
    return result, by_tag(spool_cat(server.spool_dir, tag)).get(tag, [])


def test_shared_key_delivers(keyed, tmp_path):
    """The right shared key completes the handshake; every record is acked and spooled."""
    result, records = run(tmp_path, keyed, "node.sec.key", security=security())
    assert result.returncode == 0, result.stderr
    assert records == EXPECTED


def test_wrong_shared_key_is_refused(keyed, tmp_path):
    """A wrong shared key makes send.js fail with the server's reason; nothing is spooled."""
    result, records = run(tmp_path, keyed, "node.sec.wrongkey", security=security(sharedKey="not-the-key"))
    assert result.returncode == 1
    assert "Authentication failed: shared_key mismatch" in result.stderr
    assert records == []


def test_user_and_password_deliver(with_users, tmp_path):
    """A known user with its password (and the shared key) delivers."""
    result, records = run(
        tmp_path, with_users, "node.sec.user", security=security(username="bob", password=USERS["bob"])
    )
    assert result.returncode == 0, result.stderr
    assert records == EXPECTED


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"username": "alice", "password": "wrong"}, "username/password mismatch", id="wrong-pw"),
        pytest.param(
            {"username": "mallory", "password": USERS["alice"]},
            "username/password mismatch",
            id="unknown-user",
        ),
        pytest.param({}, "invalid ping message", id="no-user"),
        pytest.param(
            {"username": "alice", "password": USERS["alice"], "sharedKey": "not-the-key"},
            "shared_key mismatch",
            id="wrong-key",
        ),
    ],
)
def test_refused_users(with_users, tmp_path, overrides, reason):
    """Wrong user credentials (or none, or the wrong key) make send.js fail; nothing is spooled."""
    tag = f"node.sec.refused.{len(overrides)}.{reason.split()[0].replace('/', '_')}"
    result, records = run(tmp_path, with_users, tag, security=security(**overrides))
    assert result.returncode == 1
    assert f"Authentication failed: {reason}" in result.stderr
    assert records == []


def test_tls_with_shared_key_delivers(tls_keyed, secrets_dir, tmp_path):
    """TLS verified against the CA, plus the shared key: every record is acked and spooled."""
    result, records = run(
        tmp_path,
        tls_keyed,
        "node.sec.tls",
        security=security(),
        tls=True,
        tlsOptions={"caFile": str(secrets_dir / "ca.pem")},
    )
    assert result.returncode == 0, result.stderr
    assert records == EXPECTED


def test_tls_client_without_the_ca_is_refused(tls_keyed, tmp_path):
    """A TLS client that does not trust the server's CA refuses to send; nothing is spooled."""
    result, records = run(tmp_path, tls_keyed, "node.sec.tls.untrusted", security=security(), tls=True)
    assert result.returncode == 1
    assert "certificate" in result.stderr
    assert records == []


def test_plain_client_to_tls_server_never_delivers(tls_keyed, tmp_path):
    """A client without TLS gets no HELO from the TLS server, which closes it; nothing is spooled."""
    result, records = run(tmp_path, tls_keyed, "node.sec.tls.plain", security=security())
    assert result.returncode == 1
    assert records == []
