"""Tests for fluentforward.protocol._auth: golden checks against Fluent Bit 5.1.1 captures, then rules."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import LocalProtocolError, RemoteProtocolError
from fluentforward.protocol._auth import (
    MAX_HANDSHAKE_FIELD_BYTES,
    REASON_INVALID_PING,
    REASON_SHARED_KEY_MISMATCH,
    REASON_USER_MISMATCH,
    PingAccepted,
    PingRejected,
    SharedKeyAuth,
    check_ping,
    encode_helo,
    encode_ping,
    encode_pong,
    parse_helo,
    password_digest,
    respond_to_ping,
    shared_key_digest,
    verify_pong,
)
from tests.conftest import FLUENT_BIT

KEY = b"s3cr3t"
CLIENT = "fb-client.local"
SERVER = "capture-server"
HELO_BYTES = 49  # the HELO is the first 49 bytes of handshake-helo-pong-from-server.bin


def decode_all(raw: bytes, *, raw_strings: bool = False) -> list[Any]:
    if raw_strings:
        unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
    else:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    unpacker.feed(raw)
    return list(unpacker)


def capture(name: str) -> bytes:
    return (FLUENT_BIT / name).read_bytes()


def server_auth(**users: bytes) -> SharedKeyAuth:
    return SharedKeyAuth(shared_key=KEY, self_hostname=SERVER, users=users)


class Handshake:
    """One captured handshake: our HELO and PONG, Fluent Bit's PING, decoded."""

    def __init__(self, server_file: str, ping_file: str) -> None:
        self.server_raw = capture(server_file)
        self.ping_raw = capture(ping_file)
        self.helo, self.pong = decode_all(self.server_raw)
        (self.ping,) = decode_all(self.ping_raw)
        self.nonce, self.auth_salt, self.keepalive = parse_helo(self.helo)
        self.salt = self.ping[2].encode("utf-8", "surrogateescape")


@pytest.fixture(name="plain")
def _plain() -> Handshake:
    return Handshake("handshake-helo-pong-from-server.bin", "handshake-ping.bin")


@pytest.fixture(name="userauth")
def _userauth() -> Handshake:
    return Handshake("handshake-userauth-helo-pong-from-server.bin", "handshake-ping-userauth.bin")


class TestGoldenCaptures:
    def test_ping_digest_verifies(self, plain: Handshake) -> None:
        """Fluent Bit's PING verifies against the nonce of our captured HELO and key s3cr3t."""
        verdict = check_ping(plain.ping, auth=server_auth(), nonce=plain.nonce, auth_salt=b"")
        assert verdict == PingAccepted(client_hostname=CLIENT, username="", salt=plain.salt)
        # The salt is 16 raw bytes that are not UTF-8: the capture README's point.
        assert len(plain.salt) == 16
        with pytest.raises(UnicodeDecodeError):
            plain.salt.decode("utf-8")

    def test_ping_digest_formula(self, plain: Handshake) -> None:
        """shared_key_digest reproduces the PING digest with the A.5 formula."""
        expected = hashlib.sha512(plain.salt + CLIENT.encode() + plain.nonce + KEY).hexdigest()
        assert shared_key_digest(plain.salt, CLIENT, plain.nonce, KEY) == expected == plain.ping[3]

    def test_pong_bytes_equal_capture(self, plain: Handshake) -> None:
        """The PONG built for the captured PING is byte for byte the PONG Fluent Bit accepted."""
        verdict, pong = respond_to_ping(plain.ping, nonce=plain.nonce, auth_salt=b"", auth=server_auth())
        assert isinstance(verdict, PingAccepted)
        assert pong == plain.server_raw[HELO_BYTES:]
        digest = shared_key_digest(plain.salt, SERVER, plain.nonce, KEY)
        assert encode_pong(True, "", SERVER, digest) == plain.server_raw[HELO_BYTES:]

    def test_helo_bytes_equal_capture(self, plain: Handshake) -> None:
        """encode_helo re-creates the captured bin-typed HELO exactly."""
        assert encode_helo(plain.nonce, plain.auth_salt, keepalive=True) == plain.server_raw[:HELO_BYTES]

    def test_userauth_helo_matches_after_decoding(self, userauth: Handshake) -> None:
        """The user-auth capture sent nonce and salt as str; our bin HELO decodes to the same values."""
        ours = encode_helo(userauth.nonce, userauth.auth_salt)
        assert ours != userauth.server_raw[: len(ours)]  # str vs bin on the wire
        (decoded,) = decode_all(ours)
        assert parse_helo(decoded) == (userauth.nonce, userauth.auth_salt, True)
        assert len(userauth.nonce) == len(userauth.auth_salt) == 16

    def test_userauth_ping_verifies(self, userauth: Handshake) -> None:
        """With users configured, alice/pw verifies and the PONG equals the captured one."""
        verdict, pong = respond_to_ping(
            userauth.ping,
            nonce=userauth.nonce,
            auth_salt=userauth.auth_salt,
            auth=server_auth(alice=b"pw"),
        )
        assert verdict == PingAccepted(client_hostname=CLIENT, username="alice", salt=userauth.salt)
        (_helo, captured_pong) = decode_all(userauth.server_raw)
        assert decode_all(pong) == [captured_pong]
        assert userauth.ping[5] == password_digest(userauth.auth_salt, "alice", b"pw")

    def test_encode_ping_equals_capture(self, userauth: Handshake) -> None:
        """encode_ping with the captured salt reproduces Fluent Bit's user-auth PING byte for byte."""
        ping = encode_ping(
            CLIENT,
            userauth.salt,
            userauth.nonce,
            KEY,
            username="alice",
            password=b"pw",
            auth_salt=userauth.auth_salt,
        )
        assert ping == userauth.ping_raw

    def test_raw_decoded_ping_verifies(self, userauth: Handshake) -> None:
        """A PING decoded with raw=True (every str as bytes, as the connection does) verifies too."""
        (ping,) = decode_all(userauth.ping_raw, raw_strings=True)
        verdict = check_ping(
            ping, auth=server_auth(alice=b"pw"), nonce=userauth.nonce, auth_salt=userauth.auth_salt
        )
        assert verdict == PingAccepted(client_hostname=CLIENT, username="alice", salt=userauth.salt)

    def test_captured_pong_verifies_on_client_side(self, plain: Handshake) -> None:
        """verify_pong accepts the captured PONG for the captured salt and nonce."""
        verify_pong(plain.pong, salt=plain.salt, nonce=plain.nonce, shared_key=KEY, client_hostname=CLIENT)

    def test_fluent_bit_server_helo(self) -> None:
        """Fluent Bit's in_forward HELO (str nonce and auth, no keepalive) parses with keepalive True."""
        (helo,) = decode_all(capture("in_forward-server-helo.bin"))
        nonce, auth_salt, keepalive = parse_helo(helo)
        assert (len(nonce), len(auth_salt), keepalive) == (16, 16, True)


class TestServerRejections:
    def test_wrong_shared_key(self, plain: Handshake) -> None:
        """A PING made with another key is rejected as a shared_key mismatch."""
        auth = SharedKeyAuth(shared_key=b"other", self_hostname=SERVER)
        verdict, pong = respond_to_ping(plain.ping, nonce=plain.nonce, auth_salt=b"", auth=auth)
        assert verdict == PingRejected(reason=REASON_SHARED_KEY_MISMATCH)
        assert decode_all(pong) == [["PONG", False, REASON_SHARED_KEY_MISMATCH, "", ""]]

    def test_wrong_nonce(self, plain: Handshake) -> None:
        """A PING replayed against a different nonce is rejected."""
        verdict = check_ping(plain.ping, auth=server_auth(), nonce=b"\x00" * 16, auth_salt=b"")
        assert verdict == PingRejected(reason=REASON_SHARED_KEY_MISMATCH)

    def test_wrong_password(self, userauth: Handshake) -> None:
        """A right user with a wrong password is rejected."""
        verdict = check_ping(
            userauth.ping, auth=server_auth(alice=b"nope"), nonce=userauth.nonce, auth_salt=userauth.auth_salt
        )
        assert verdict == PingRejected(reason=REASON_USER_MISMATCH)

    def test_unknown_user(self, userauth: Handshake) -> None:
        """A user missing from the users map is rejected with the same reason as a bad password."""
        verdict = check_ping(
            userauth.ping, auth=server_auth(bob=b"pw"), nonce=userauth.nonce, auth_salt=userauth.auth_salt
        )
        assert verdict == PingRejected(reason=REASON_USER_MISMATCH)

    def test_unknown_user_with_empty_password(self) -> None:
        """An unknown user cannot log in by sending the digest of an empty password."""
        nonce, auth_salt, salt = b"n" * 16, b"a" * 16, b"s" * 16
        ping = decode_all(encode_ping(CLIENT, salt, nonce, KEY, username="mallory", auth_salt=auth_salt))[0]
        verdict = check_ping(ping, auth=server_auth(alice=b""), nonce=nonce, auth_salt=auth_salt)
        assert verdict == PingRejected(reason=REASON_USER_MISMATCH)

    def test_user_auth_off_ignores_password_fields(self, userauth: Handshake) -> None:
        """Without users the password fields are not checked, as in Fluentd."""
        verdict = check_ping(userauth.ping, auth=server_auth(), nonce=userauth.nonce, auth_salt=b"")
        assert verdict == PingAccepted(client_hostname=CLIENT, username="", salt=userauth.salt)

    @pytest.mark.parametrize(
        "ping",
        [
            None,
            "PING",
            [],
            ["PING"],
            ["PING", CLIENT, "salt", "d" * 128, ""],
            ["PING", CLIENT, "salt", "d" * 128, "", "", ""],
            ["PONG", CLIENT, "salt", "d" * 128, "", ""],
            {"PING": 1},
        ],
    )
    def test_bad_shape(self, ping: object) -> None:
        """A message that is not a 6-element PING is rejected as invalid."""
        verdict = check_ping(ping, auth=server_auth(), nonce=b"n", auth_salt=b"")
        assert verdict == PingRejected(reason=REASON_INVALID_PING)

    @pytest.mark.parametrize("index", range(1, 6))
    def test_bad_field_type(self, index: int) -> None:
        """A PING field that is neither str nor bin is rejected as invalid, naming the field."""
        ping: list[object] = ["PING", CLIENT, "salt", "d" * 128, "", ""]
        ping[index] = 7
        verdict = check_ping(ping, auth=server_auth(), nonce=b"n", auth_salt=b"")
        assert isinstance(verdict, PingRejected)
        assert verdict.reason.startswith(REASON_INVALID_PING + ": ")

    def test_oversized_field(self) -> None:
        """A PING field longer than the bound is rejected before any hashing."""
        ping = ["PING", CLIENT, b"s" * (MAX_HANDSHAKE_FIELD_BYTES + 1), "d" * 128, "", ""]
        verdict = check_ping(ping, auth=server_auth(), nonce=b"n", auth_salt=b"")
        assert verdict == PingRejected(reason=f"{REASON_INVALID_PING}: salt too long")

    def test_user_auth_without_salt_is_a_local_error(self, plain: Handshake) -> None:
        """Checking user auth with an empty auth salt is our bug and raises LocalProtocolError."""
        with pytest.raises(LocalProtocolError):
            check_ping(plain.ping, auth=server_auth(alice=b"pw"), nonce=plain.nonce, auth_salt=b"")

    def test_secrets_stay_out_of_repr_and_reasons(self, userauth: Handshake) -> None:
        """Neither the settings' repr nor any rejection reason contains the key or a password."""
        auth = server_auth(alice=b"pw-secret-value")
        assert "s3cr3t" not in repr(auth)
        assert "pw-secret-value" not in repr(auth)
        for key in (KEY, b"wrong"):
            verdict = check_ping(
                userauth.ping,
                auth=SharedKeyAuth(shared_key=key, self_hostname=SERVER, users={"alice": b"pw-secret-value"}),
                nonce=userauth.nonce,
                auth_salt=userauth.auth_salt,
            )
            assert isinstance(verdict, PingRejected)
            assert "s3cr3t" not in verdict.reason
            assert "secret" not in verdict.reason

    def test_empty_self_hostname_refused(self) -> None:
        """SharedKeyAuth refuses an empty self_hostname."""
        with pytest.raises(ValueError, match="self_hostname"):
            SharedKeyAuth(shared_key=KEY, self_hostname="")


class TestClientChecks:
    @pytest.mark.parametrize(
        "helo",
        [
            None,
            ["HELO"],
            ["PING", {}],
            ["HELO", "options"],
            ["HELO", {"nonce": 1}],
            ["HELO", {"nonce": b"n", "auth": []}],
            ["HELO", {"nonce": b"n", "keepalive": "yes"}],
        ],
    )
    def test_bad_helo(self, helo: object) -> None:
        """A malformed HELO raises RemoteProtocolError."""
        with pytest.raises(RemoteProtocolError):
            parse_helo(helo)

    def test_nil_helo_options(self) -> None:
        """A nil options map reads as empty, as Fluentd's client does."""
        assert parse_helo(["HELO", None]) == (b"", b"", True)

    def test_encode_ping_without_auth_salt_sends_empty_user_fields(self) -> None:
        """With an empty HELO auth, PING carries "" for username and password, like Fluentd."""
        (ping,) = decode_all(encode_ping(CLIENT, b"salt", b"nonce", KEY, username="alice", password=b"pw"))
        assert ping == ["PING", CLIENT, "salt", shared_key_digest(b"salt", CLIENT, b"nonce", KEY), "", ""]

    def test_encode_ping_packs_salt_as_str(self) -> None:
        """The salt goes out as msgpack str even when it is not UTF-8 (Fluent Bit refuses bin)."""
        salt = bytes(range(240, 256))
        ping = encode_ping(CLIENT, salt, b"nonce", KEY)
        assert b"\xb0" + salt in ping  # fixstr of 16 bytes

    def test_pong_failure(self, plain: Handshake) -> None:
        """PONG false raises with the server's reason."""
        pong = ["PONG", False, REASON_SHARED_KEY_MISMATCH, "", ""]
        with pytest.raises(RemoteProtocolError, match="authentication failed: 'shared_key mismatch'"):
            verify_pong(pong, salt=plain.salt, nonce=plain.nonce, shared_key=KEY, client_hostname=CLIENT)

    def test_pong_same_hostname(self, plain: Handshake) -> None:
        """A server using our own hostname is refused, as Fluentd's client does."""
        with pytest.raises(RemoteProtocolError, match="same hostname"):
            verify_pong(
                plain.pong, salt=plain.salt, nonce=plain.nonce, shared_key=KEY, client_hostname=SERVER
            )

    def test_pong_wrong_digest(self, plain: Handshake) -> None:
        """A PONG digest made with another key is refused."""
        with pytest.raises(RemoteProtocolError, match="digest mismatch"):
            verify_pong(
                plain.pong, salt=plain.salt, nonce=plain.nonce, shared_key=b"x", client_hostname=CLIENT
            )

    @pytest.mark.parametrize(
        "pong",
        [["PONG", True, "", SERVER], ["PING", True, "", SERVER, "d"], ["PONG", True, "", 5, "d"], "PONG"],
    )
    def test_pong_bad_shape(self, pong: object) -> None:
        """A PONG of the wrong arity, marker or field type raises RemoteProtocolError."""
        with pytest.raises(RemoteProtocolError):
            verify_pong(pong, salt=b"s", nonce=b"n", shared_key=KEY, client_hostname=CLIENT)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
wire_text = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))


@given(
    st.lists(msgpack_values, max_size=8)
    | st.lists(msgpack_values | wire_text, min_size=5, max_size=5).map(lambda rest: ["PING", *rest])
    | msgpack_values
    | st.text().map(lambda s: ["PING", s, "\ud800", "d", "u", "p"])
)
def test_junk_ping_is_rejected_never_raises(msg: object) -> None:
    """Verification of arbitrary junk returns PingRejected and raises nothing."""
    auth = SharedKeyAuth(shared_key=KEY, self_hostname=SERVER, users={"alice": b"pw"})
    verdict, pong = respond_to_ping(msg, nonce=b"n" * 16, auth_salt=b"a" * 16, auth=auth)
    assert isinstance(verdict, PingRejected)
    assert decode_all(pong)[0][:2] == ["PONG", False]


@given(
    hostname=wire_text.filter(lambda s: s != SERVER),
    salt=st.binary(min_size=1, max_size=32),
    nonce=st.binary(max_size=32),
    key=st.binary(max_size=32),
    password=st.binary(max_size=16),
    auth_salt=st.binary(min_size=1, max_size=16),
)
def test_client_and_server_agree(
    hostname: str, salt: bytes, nonce: bytes, key: bytes, password: bytes, auth_salt: bytes
) -> None:
    """A PING from encode_ping passes check_ping, and the PONG from respond_to_ping passes verify_pong."""
    auth = SharedKeyAuth(shared_key=key, self_hostname=SERVER, users={"alice": password})
    (ping,) = decode_all(
        encode_ping(hostname, salt, nonce, key, username="alice", password=password, auth_salt=auth_salt)
    )
    verdict, pong = respond_to_ping(ping, nonce=nonce, auth_salt=auth_salt, auth=auth)
    assert verdict == PingAccepted(client_hostname=hostname, username="alice", salt=salt)
    (decoded_pong,) = decode_all(pong)
    verify_pong(decoded_pong, salt=salt, nonce=nonce, shared_key=key, client_hostname=hostname)
