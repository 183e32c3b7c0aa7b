"""The Forward handshake (HELO / PING / PONG), both sides, as pure functions.

Sans-IO: nothing here reads a socket, draws randomness or looks at the clock. The server's nonce
and auth salt and the client's shared-key salt are arguments, so golden tests compare bytes.

Messages (Forward protocol v1, as Fluentd and Fluent Bit speak it)::

    HELO  server -> client  ["HELO", {"nonce": bin, "auth": bin, "keepalive": bool}]
    PING  client -> server  ["PING", client_hostname, salt, shared_key_digest, username, password_digest]
    PONG  server -> client  ["PONG", true, "", server_hostname, shared_key_digest]
                            ["PONG", false, reason, "", ""]          (then the server disconnects)

Digests are lowercase hex SHA-512 over byte concatenations (``‖``)::

    PING digest      = sha512(salt ‖ client_hostname ‖ nonce ‖ shared_key)
    PING password    = sha512(auth_salt ‖ username ‖ password)
    PONG digest      = sha512(salt ‖ server_hostname ‖ nonce ‖ shared_key)

Invariants:

- Input is a message decoded with the project convention (msgpack ``str`` -> ``str`` with
  ``surrogateescape``, ``bin`` -> ``bytes``). Salts, nonces, names and digests may arrive as either;
  they are turned back into the exact wire bytes before hashing (Fluent Bit sends its salt as a
  ``str`` of 16 random bytes, which is rarely valid UTF-8).
- :func:`check_ping` never raises for anything a peer can send: it returns :class:`PingRejected`.
  The client-side checks (:func:`parse_helo`, :func:`verify_pong`) raise only
  :class:`~fluentforward.errors.RemoteProtocolError`.
- Digests are compared with :func:`hmac.compare_digest`. No reason string and no ``repr`` contains
  a shared key or a password.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import attrs
import msgpack

from fluentforward.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REASON_INVALID_PING",
    "REASON_SHARED_KEY_MISMATCH",
    "REASON_USER_MISMATCH",
    "PingAccepted",
    "PingRejected",
    "SharedKeyAuth",
    "check_ping",
    "encode_helo",
    "encode_ping",
    "encode_pong",
    "parse_helo",
    "password_digest",
    "respond_to_ping",
    "shared_key_digest",
    "verify_pong",
]

# Reasons sent back in PONG false. The first words match Fluentd's in_forward, so operators who
# grep for Fluentd's messages find ours; details after the colon never name a secret.
REASON_INVALID_PING = "invalid ping message"
REASON_SHARED_KEY_MISMATCH = "shared_key mismatch"
REASON_USER_MISMATCH = "username/password mismatch"

# Real PING fields are short: salts are 16 raw bytes (Fluent Bit) or 32 hex chars (Fluentd),
# hostnames at most 253 characters, digests 128. Anything longer is junk, and refusing it before
# hashing bounds the work an unauthenticated peer can make us do.
MAX_HANDSHAKE_FIELD_BYTES = 1024

# A PONG reason is peer text that ends up in our error messages and logs: keep a bounded preview.
MAX_PEER_REASON_CHARS = 200

_PING_ARITY = 6
_PING_FIELDS = ("hostname", "salt", "digest", "username", "password")
_PONG_ARITY = 5


def _copy_users(users: Mapping[str, bytes]) -> dict[str, bytes]:
    """Own a copy, so the settings cannot change behind a running server's back."""
    return dict(users)


@attrs.frozen(kw_only=True)
class SharedKeyAuth:
    """Server-side handshake settings: what the server config hands to each connection.

    Attributes:
        shared_key: the key both sides know (may be empty, like Fluent Bit's ``empty_shared_key``).
        self_hostname: our name, sent in PONG; Fluentd clients refuse a server named like themselves.
        users: username -> password. Empty means user authentication is off.
    """

    shared_key: bytes = attrs.field(repr=False)
    self_hostname: str = attrs.field()
    users: Mapping[str, bytes] = attrs.field(factory=dict, converter=_copy_users, repr=False)

    @self_hostname.validator
    def _check_hostname(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if not value:
            raise ValueError("self_hostname must not be empty")

    @property
    def user_auth(self) -> bool:
        """True when PING must carry a valid username/password digest."""
        return bool(self.users)


@attrs.frozen(kw_only=True)
class PingAccepted:
    """The PING verified.

    Attributes:
        client_hostname: the name the client gave (lossless ``str``, may hold surrogates).
        username: the authenticated user, ``""`` when user authentication is off.
        salt: the client's shared-key salt as wire bytes; the PONG digest is computed over it.
    """

    client_hostname: str
    username: str
    salt: bytes


@attrs.frozen(kw_only=True)
class PingRejected:
    """The PING failed; ``reason`` goes into PONG false and the connection must close."""

    reason: str


def _wire_bytes(value: object) -> bytes | None:
    """Return the wire bytes of a decoded msgpack ``str``/``bin``, or None for any other value."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            # Surrogates outside U+DC80..U+DCFF cannot come from decoding wire bytes.
            return None
    return None


def _is_message(msg: object, name: str, arity: int) -> bool:
    """True for ``[name, ...]`` of the given arity; the name may be ``str`` or (``raw=True``) ``bytes``."""
    return (
        isinstance(msg, list | tuple)
        and len(msg) == arity
        and (msg[0] == name or msg[0] == name.encode("ascii"))
    )


def _option(options: dict[Any, Any], key: str, default: object) -> Any:
    """Look a HELO option up by ``str`` key, or by ``bytes`` key when decoded with ``raw=True``."""
    if key in options:
        return options[key]
    return options.get(key.encode("ascii"), default)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


def _sha512_hex(*parts: bytes | str) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(_as_bytes(part))
    return digest.hexdigest()


def _packb(message: object) -> bytes:
    # surrogateescape lets names that arrived with invalid UTF-8 go back out byte for byte.
    return msgpack.packb(message, use_bin_type=True, unicode_errors="surrogateescape")  # type: ignore[no-any-return]


def _preview(value: object) -> str:
    text = repr(value)
    if len(text) > MAX_PEER_REASON_CHARS:
        return text[:MAX_PEER_REASON_CHARS] + "..."
    return text


def shared_key_digest(
    salt: bytes | str, hostname: bytes | str, nonce: bytes | str, shared_key: bytes | str
) -> str:
    """Return ``hex(sha512(salt ‖ hostname ‖ nonce ‖ shared_key))`` (128 lowercase hex chars).

    The same formula serves PING (client hostname) and PONG (server hostname). ``str`` arguments
    are encoded as UTF-8 with ``surrogateescape``, i.e. back to their wire bytes.
    """
    return _sha512_hex(salt, hostname, nonce, shared_key)


def password_digest(auth_salt: bytes | str, username: bytes | str, password: bytes | str) -> str:
    """Return ``hex(sha512(auth_salt ‖ username ‖ password))``, the PING password field."""
    return _sha512_hex(auth_salt, username, password)


# --- server side -------------------------------------------------------------------------------


def encode_helo(nonce: bytes, auth_salt: bytes, keepalive: bool = True) -> bytes:
    """Encode HELO as one msgpack message (it must go out in a single write).

    Args:
        nonce: fresh random bytes for this connection (Fluentd uses 16).
        auth_salt: random bytes when user authentication is on, ``b""`` when it is off.
        keepalive: False tells the client we close after one message.

    Returns:
        ``["HELO", {"nonce": bin, "auth": bin, "keepalive": bool}]`` packed.
    """
    return _packb(["HELO", {"nonce": nonce, "auth": auth_salt, "keepalive": keepalive}])


def encode_pong(ok: bool, reason: str, server_hostname: str, digest: str) -> bytes:
    """Encode PONG. A failure is ``encode_pong(False, reason, "", "")``.

    Fluent Bit reads PONG in one read of at most 1024 bytes: send it in a single write.
    """
    return _packb(["PONG", ok, reason, server_hostname, digest])


def check_ping(
    msg: Any, *, auth: SharedKeyAuth, nonce: bytes, auth_salt: bytes
) -> PingAccepted | PingRejected:
    """Verify a decoded PING against the server's settings and what its HELO sent.

    Works on a message decoded with the project convention or with ``raw=True`` (every ``str``
    as ``bytes``).

    Args:
        msg: the decoded message (anything a peer may send).
        auth: the server's handshake settings. With no ``users`` the password fields are ignored,
            as Fluentd does (Fluent Bit then sends ``sha512("")``).
        nonce: the nonce of our HELO.
        auth_salt: the auth salt of our HELO (non-empty when ``auth.users`` is set).

    Returns:
        PingAccepted, or PingRejected with a reason fit for PONG false. Never raises for peer input.

    Raises:
        LocalProtocolError: user authentication is on but ``auth_salt`` is empty (a server bug: the
            password digest would not depend on anything random).
    """
    if auth.user_auth and not auth_salt:
        raise LocalProtocolError("user authentication needs a non-empty auth salt in HELO")
    if not _is_message(msg, "PING", _PING_ARITY):
        return PingRejected(reason=REASON_INVALID_PING)
    fields: list[bytes] = []
    for name, value in zip(_PING_FIELDS, msg[1:], strict=True):
        wire = _wire_bytes(value)
        if wire is None:
            return PingRejected(reason=f"{REASON_INVALID_PING}: {name} must be str or bin")
        if len(wire) > MAX_HANDSHAKE_FIELD_BYTES:
            return PingRejected(reason=f"{REASON_INVALID_PING}: {name} too long")
        fields.append(wire)
    hostname, salt, digest, username, password = fields

    expected = shared_key_digest(salt, hostname, nonce, auth.shared_key).encode("ascii")
    if not hmac.compare_digest(expected, digest):
        return PingRejected(reason=REASON_SHARED_KEY_MISMATCH)

    username_str = ""
    if auth.user_auth:
        username_str = username.decode("utf-8", "surrogateescape")
        known = auth.users.get(username_str)
        # Hash even for an unknown user so the reply time does not tell which part was wrong.
        expected = password_digest(auth_salt, username, known or b"").encode("ascii")
        if not hmac.compare_digest(expected, password) or known is None:
            return PingRejected(reason=REASON_USER_MISMATCH)
    return PingAccepted(
        client_hostname=hostname.decode("utf-8", "surrogateescape"),
        username=username_str,
        salt=salt,
    )


def respond_to_ping(
    msg: Any, *, nonce: bytes, auth_salt: bytes, auth: SharedKeyAuth
) -> tuple[PingAccepted | PingRejected, bytes]:
    """Verify a PING with the server's settings and build the PONG to send back.

    Args:
        msg: the decoded PING.
        nonce: the nonce of our HELO.
        auth_salt: the auth salt of our HELO (``b""`` when ``auth.users`` is empty).
        auth: the server's handshake settings.

    Returns:
        The verdict and the encoded PONG (true with our digest, or false with the reason).
    """
    verdict = check_ping(msg, auth=auth, nonce=nonce, auth_salt=auth_salt)
    if isinstance(verdict, PingRejected):
        return verdict, encode_pong(False, verdict.reason, "", "")
    digest = shared_key_digest(verdict.salt, auth.self_hostname, nonce, auth.shared_key)
    return verdict, encode_pong(True, "", auth.self_hostname, digest)


# --- client side -------------------------------------------------------------------------------


def parse_helo(msg: Any) -> tuple[bytes, bytes, bool]:
    """Read a decoded HELO.

    Returns:
        ``(nonce, auth_salt, keepalive)``. ``auth`` defaults to ``b""`` and ``keepalive`` to True
        (Fluent Bit's server omits ``keepalive``).

    Raises:
        RemoteProtocolError: the message is not a HELO.
    """
    if not _is_message(msg, "HELO", 2):
        raise RemoteProtocolError(f"expected HELO, got {_preview(msg)}")
    options = msg[1]
    if options is None:  # Fluentd's client reads a nil options map as empty
        options = {}
    if not isinstance(options, dict):
        raise RemoteProtocolError("HELO options must be a map")
    nonce = _wire_bytes(_option(options, "nonce", b""))
    auth_salt = _wire_bytes(_option(options, "auth", b""))
    keepalive = _option(options, "keepalive", True)
    if nonce is None or auth_salt is None:
        raise RemoteProtocolError("HELO nonce and auth must be str or bin")
    if not isinstance(keepalive, bool):
        raise RemoteProtocolError("HELO keepalive must be a bool")
    return nonce, auth_salt, keepalive


def encode_ping(
    client_hostname: str,
    salt: bytes,
    nonce: bytes,
    shared_key: bytes,
    *,
    username: str = "",
    password: bytes = b"",
    auth_salt: bytes = b"",
) -> bytes:
    """Encode our PING answer to a HELO.

    The salt goes out as msgpack ``str`` whatever its bytes: Fluent Bit's in_forward refuses a
    ``bin`` salt. As in Fluentd, the user fields are ``"", ""`` when the HELO ``auth`` is empty,
    and a digest (of possibly empty credentials) otherwise.

    Args:
        client_hostname: our self_hostname.
        salt: fresh random bytes for this connection.
        nonce: the HELO nonce.
        shared_key: the shared key.
        username: our user name (used only when ``auth_salt`` is non-empty).
        password: our password (same).
        auth_salt: the HELO ``auth`` value.
    """
    digest = shared_key_digest(salt, client_hostname, nonce, shared_key)
    if auth_salt:
        user, user_digest = username, password_digest(auth_salt, username, password)
    else:
        user, user_digest = "", ""
    salt_str = salt.decode("utf-8", "surrogateescape")
    return _packb(["PING", client_hostname, salt_str, digest, user, user_digest])


def verify_pong(msg: Any, *, salt: bytes, nonce: bytes, shared_key: bytes, client_hostname: str) -> None:
    """Check a decoded PONG the way Fluentd's out_forward does.

    Args:
        msg: the decoded PONG.
        salt: the salt of our PING.
        nonce: the HELO nonce.
        shared_key: the shared key.
        client_hostname: our self_hostname (the server must not use the same name).

    Raises:
        RemoteProtocolError: not a PONG, authentication refused, same hostname, or a wrong digest.
    """
    if not _is_message(msg, "PONG", _PONG_ARITY):
        raise RemoteProtocolError(f"expected PONG, got {_preview(msg)}")
    _, ok, reason, server_hostname, digest = msg
    if ok is not True:
        raise RemoteProtocolError(f"authentication failed: {_preview(reason)}")
    hostname_bytes = _wire_bytes(server_hostname)
    digest_bytes = _wire_bytes(digest)
    if hostname_bytes is None or digest_bytes is None:
        raise RemoteProtocolError("PONG hostname and digest must be str or bin")
    if hostname_bytes == _as_bytes(client_hostname):
        raise RemoteProtocolError("same hostname between server and client: invalid configuration")
    expected = shared_key_digest(salt, hostname_bytes, nonce, shared_key).encode("ascii")
    if not hmac.compare_digest(expected, digest_bytes):
        raise RemoteProtocolError("PONG shared_key digest mismatch")
