"""TLS with pyOpenSSL: server contexts (SNI), client contexts for back-ends, and a
gevent-cooperative connection object the session code uses like a socket.

The API other modules use (IMAP/POP3 here, SMTP submission too):

* ``load_material(tls_config)`` reads and checks every certificate and key named by ``[tls]``
  (raises ``TlsError``, one line naming the key, the file and the reason).  The master calls
  ``preload(config)`` at start and on HUP: the PEM bytes are kept in memory and inherited by
  the workers it forks, so a certificate replaced by a broken one on disk is logged on HUP
  and the old one stays in use, also for workers respawned later.
* ``server_context(config) -> ServerContext``: the worker's contexts (default certificate
  plus ``[[tls.certificates]]`` chosen by SNI): the ones ``preload`` made in the master
  before the fork when the ``[tls]`` section is the same, so the workers of one generation
  share their session ticket keys.
* ``wrap_server(sock, server_ctx, timeout) -> TlsConnection``: the server handshake on an
  accepted socket, bounded by ``timeout`` in total (raises ``TlsHandshakeError``).
* ``wrap_client(sock, backend, timeout) -> TlsConnection``: the client handshake to a
  back-end, verifying its chain against ``tls_ca_file`` (or the system CAs) and its name
  against ``tls_verify_name`` (or ``address``).
* ``starttls_client(sock, backend, protocol, timeout)``: STARTTLS (IMAP) / STLS (POP3) on a
  fresh back-end connection, then ``wrap_client``; the greeting is pushed back for the login.
* ``check(config)``: everything above checked for check-config / serve / HUP (TlsError).
* ``TlsConnection`` (gateway.tlsconn): ``recv``, ``recv_into``, ``send``, ``sendall``, ``settimeout``,
  ``gettimeout``, ``fileno``, ``close``, ``getsockname``, ``getpeername``, ``setsockopt``,
  ``pending``.  Timeouts raise ``socket.timeout`` and TLS failures ``OSError``, as a socket's.

This module does not import gevent at import time: the master imports it to check
certificates and must stay unpatched.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from gateway.tlsconn import TlsConnection, TlsHandshakeError, _ssl_reason  # noqa: F401 (API)

log = logging.getLogger("mailgate.tls")

# Mozilla's "intermediate" list (TLS 1.2 part; TLS 1.3 suites are always on): forward secrecy,
# AEAD only.  Overridable with [tls] ciphers.
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                   "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


class TlsError(Exception):
    """A certificate/key/CA problem; str() is one line naming the key, file and reason."""


# -- certificates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """One certificate: leaf, chain and key, parsed; ``names`` for SNI ("" = default)."""
    cert: object          # cryptography x509.Certificate
    chain: tuple
    key: object           # a cryptography private key
    names: tuple[str, ...] = ()
    source: str = ""


@dataclass
class Material:
    """Every identity of a [tls] section, keyed by the files they came from."""
    identities: list[Identity] = field(default_factory=list)
    key: tuple = ()

    @property
    def default(self) -> Identity | None:
        return self.identities[0] if self.identities else None


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TlsError(f"{key}: {path}: cannot read: {exc.strerror}") from None


def _pem_certs(data: bytes, path: str, key: str) -> list:
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    certs = []
    for block in blocks:
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise TlsError(f"{key}: {path}: not a valid PEM certificate") from None
    if not certs:
        raise TlsError(f"{key}: {path}: no PEM certificate in the file")
    return certs


def load_identity(cert_file: str, key_file: str, chain_file: str = "",
                  names: tuple[str, ...] = (), prefix: str = "tls") -> Identity:
    """Read one certificate (leaf first, optional chain after it or in ``chain_file``) and
    its key, and check that they belong together; raises TlsError."""
    certs = _pem_certs(_read(cert_file, f"{prefix}.cert_file"), cert_file, f"{prefix}.cert_file")
    if chain_file:
        certs += _pem_certs(_read(chain_file, f"{prefix}.chain_file"), chain_file,
                            f"{prefix}.chain_file")
    key_data = _read(key_file, f"{prefix}.key_file")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{prefix}.key_file: {key_file}: not a valid PEM private key "
                       "(encrypted keys are not supported)") from None
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        context.use_certificate(certs[0])
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise TlsError(f"{prefix}.key_file: {key_file} does not match the certificate "
                       f"in {cert_file}") from None
    return Identity(certs[0], tuple(certs[1:]), key, tuple(n.lower() for n in names), cert_file)


def load_material(tls_config) -> Material:
    """Every certificate of a [tls] section, read and checked; raises TlsError."""
    material = Material(key=_material_key(tls_config))
    if tls_config.cert_file:
        material.identities.append(load_identity(tls_config.cert_file, tls_config.key_file,
                                                 tls_config.chain_file))
    for index, extra in enumerate(tls_config.certificates):
        material.identities.append(load_identity(
            extra.cert_file, extra.key_file, extra.chain_file, extra.server_names,
            prefix=f"tls.certificates[{index}]"))
    return material


def _material_key(tls_config) -> tuple:
    files = [(tls_config.cert_file, tls_config.key_file, tls_config.chain_file)]
    files += [(c.cert_file, c.key_file, c.chain_file) for c in tls_config.certificates]
    return tuple(files)


_preloaded: Material | None = None
_prebuilt: tuple | None = None     # (the [tls] section, its ServerContext), made by preload


def preload(config) -> None:
    """Read the certificates and make the server contexts now (the master, at start and on
    HUP); raises TlsError and then keeps what was loaded before.  Forked workers inherit
    both: OpenSSL makes a context's session ticket keys when it makes the context, so the
    workers of one generation share them and a client resumes its TLS session on whichever
    worker the kernel hands its next connection to (each worker's own contexts would
    resume on one worker in N).  A HUP makes new contexts, hence new ticket keys."""
    global _preloaded, _prebuilt
    if not needs_server_tls(config):
        return
    material = load_material(config.tls)
    try:
        context = ServerContext(config.tls, material)
    except SSL.Error as exc:      # check() has tried the same settings: not expected
        raise TlsError(f"[tls]: {_ssl_reason(exc)}") from None
    _preloaded, _prebuilt = material, (config.tls, context)


def check(config) -> None:
    """Everything TLS in a config, checked before it is used (check-config, serve, HUP):
    certificates and keys readable and matching, the cipher list valid, back-end CA files
    readable.  Raises TlsError with one line naming the key and the reason."""
    if needs_server_tls(config):
        material = load_material(config.tls)
        try:
            ServerContext(config.tls, material)
        except SSL.Error as exc:
            raise TlsError(f"tls.ciphers: {_ssl_reason(exc)}") from None
    for name, backend in config.backends.items():
        if backend.tls != "none" and backend.tls_ca_file:
            check_ca_file(backend.tls_ca_file, f"backends.{name}.tls_ca_file")


def needs_server_tls(config) -> bool:
    return any(l.tls != "none" for l in config.listen if l.protocol != "health")


# -- server side ------------------------------------------------------------------------------

class ServerContext:
    """A worker's server contexts: the default one and one per SNI certificate."""

    def __init__(self, tls_config, material: Material):
        self.default = self._context(tls_config, material.default)
        self.by_name: list[tuple[str, SSL.Context]] = []
        for identity in material.identities[1:]:
            context = self._context(tls_config, identity)
            self.by_name += [(name, context) for name in identity.names]
        if self.by_name:
            self.default.set_tlsext_servername_callback(self._pick)

    @staticmethod
    def _context(tls_config, identity: Identity) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(VERSIONS[tls_config.min_version])
        context.set_cipher_list((tls_config.ciphers or DEFAULT_CIPHERS).encode())
        options = (SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                   | SSL.OP_NO_RENEGOTIATION)
        if not tls_config.session_tickets:
            options |= SSL.OP_NO_TICKET
        context.set_options(options)
        # An idle session gives its 34 KiB of record buffers back to the allocator.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if tls_config.session_cache:
            context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            context.set_session_id(b"mailgate")
        else:
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_timeout(int(tls_config.session_lifetime))
        context.use_certificate(identity.cert)
        for extra in identity.chain:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(identity.key)
        return context

    def _pick(self, connection: SSL.Connection) -> None:
        """SNI: switch to the certificate whose names match (exact, then "*.domain")."""
        name = (connection.get_servername() or b"").decode("ascii", "replace").lower()
        if not name:
            return
        for pattern, context in self.by_name:
            if pattern == name or (pattern.startswith("*.") and
                                   fnmatch.fnmatchcase(name, pattern) and
                                   name.count(".") == pattern.count(".")):
                connection.set_context(context)
                return


def server_context(config) -> ServerContext | None:
    """The worker's server contexts (None when no listener uses TLS)."""
    if not needs_server_tls(config):
        return None
    if _prebuilt is not None and _prebuilt[0] == config.tls:
        return _prebuilt[1]
    material = _preloaded
    if material is None or material.key != _material_key(config.tls):
        material = load_material(config.tls)
    return ServerContext(config.tls, material)


def wrap_server(sock, server_ctx: ServerContext, timeout: float) -> "TlsConnection":
    """Server handshake on ``sock`` within ``timeout`` seconds in total.

    Raises TlsHandshakeError (``sock`` is left for the caller to close)."""
    connection = SSL.Connection(server_ctx.default, sock)
    connection.set_accept_state()
    tls = TlsConnection(connection, sock)
    tls.handshake(timeout)
    return tls


def handshake_metered(sock, server_ctx: ServerContext, timeout: float) -> "TlsConnection":
    """``wrap_server`` counted in the worker's metrics (mailgate_tls_handshakes{result})."""
    from gateway.metrics import recorder
    try:
        connection = wrap_server(sock, server_ctx, timeout)
    except TlsHandshakeError:
        recorder.tls_handshake(False)
        raise
    recorder.tls_handshake(True)
    return connection


# -- client side (back-ends) ------------------------------------------------------------------

_client_contexts: dict[str, SSL.Context] = {}


def client_context(ca_file: str) -> SSL.Context:
    """A verifying client context for ``ca_file`` ("" = the system CAs), cached per file."""
    context = _client_contexts.get(ca_file)
    if context is None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION)
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        try:
            if ca_file:
                context.load_verify_locations(ca_file)
            else:
                context.set_default_verify_paths()
        except SSL.Error:
            raise TlsError(f"tls_ca_file: {ca_file}: not a readable PEM CA bundle") from None
        _client_contexts[ca_file] = context
    return context


def check_ca_file(ca_file: str, key: str) -> None:
    """Raise TlsError (naming ``key``) unless ``ca_file`` holds at least one certificate."""
    _pem_certs(_read(ca_file, key), ca_file, key)


def wrap_client(sock, backend, timeout: float) -> "TlsConnection":
    """Client handshake to ``backend`` (a BackendConfig): the chain is verified against its
    ``tls_ca_file`` and the certificate must name ``tls_verify_name`` or its address.
    Raises TlsHandshakeError with the reason."""
    expected = backend.tls_verify_name or backend.address
    connection = SSL.Connection(client_context(backend.tls_ca_file), sock)
    connection.set_connect_state()
    if not _is_ip(expected):
        connection.set_tlsext_host_name(expected.encode("idna"))
    tls = TlsConnection(connection, sock)
    tls.handshake(timeout)
    cert = connection.get_peer_certificate(as_cryptography=True)
    if cert is None or not name_matches(cert, expected):
        raise TlsHandshakeError(f"certificate does not name {expected!r} "
                                f"(it names {', '.join(cert_names(cert)) or 'nothing'})")
    return tls


# -- STARTTLS to a back-end ------------------------------------------------------------------

MAX_BACKEND_LINE = 8192


def _read_line(sock, buffer: bytearray) -> bytes:
    """One CRLF line from a plain back-end socket (its timeout already set), bounded."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_BACKEND_LINE:
            raise TlsHandshakeError("answer line too long before STARTTLS")
        data = sock.recv(4096)
        if not data:
            raise TlsHandshakeError("closed the connection before STARTTLS")
        buffer += data
    end = buffer.index(b"\n") + 1
    line = bytes(buffer[:end])
    del buffer[:end]
    return line


MAX_EHLO_LINES = 100


def _smtp_starttls(sock, buffer: bytearray, greeting: bytes) -> tuple[bool, bytes, bytes]:
    """SMTP's STARTTLS (RFC 3207 §4): EHLO first, then STARTTLS; (accepted, its answer, the
    whole greeting).  The submission login says EHLO again over TLS, after the pushed-back
    greeting."""
    if not greeting.startswith(b"220"):
        raise TlsHandshakeError(f"greeting {greeting[:80]!r} instead of 220")
    lines = [greeting]
    while lines[-1][3:4] == b"-" and len(lines) < MAX_EHLO_LINES:   # RFC 5321 §4.2
        lines.append(_read_line(sock, buffer))
    name = socket.gethostname().encode("ascii", "replace") or b"mailgate"
    sock.sendall(b"EHLO " + name + b"\r\n")
    for _ in range(MAX_EHLO_LINES):
        line = _read_line(sock, buffer)
        if not line.startswith(b"250"):
            raise TlsHandshakeError(f"EHLO answered {line[:80]!r}")
        if line[3:4] != b"-":
            break
    else:
        raise TlsHandshakeError("EHLO answer of too many lines")
    sock.sendall(b"STARTTLS\r\n")
    answer = _read_line(sock, buffer)
    return answer.startswith(b"220"), answer, b"".join(lines)


def starttls_client(sock, backend, protocol: str, timeout: float) -> "TlsConnection":
    """STARTTLS (IMAP, RFC 3501 §6.2.1; SMTP, RFC 3207) or STLS (POP3, RFC 2595 §4) on a
    fresh back-end connection, then ``wrap_client``.  The greeting read here is pushed back into the
    connection (less any IMAP CAPABILITY code: capabilities must be asked again over TLS),
    so the back-end login reads it as if nothing had happened.  Raises TlsHandshakeError."""
    buffer = bytearray()
    greeting = _read_line(sock, buffer)
    if protocol == "submission":
        ok, answer, replay = _smtp_starttls(sock, buffer, greeting)
    elif protocol == "imap":
        if not greeting.startswith(b"* OK"):
            raise TlsHandshakeError(f"greeting {greeting[:80]!r} instead of * OK")
        sock.sendall(b"MGTLS STARTTLS\r\n")
        answer = _read_line(sock, buffer)
        while answer.startswith(b"* "):
            answer = _read_line(sock, buffer)
        ok = answer.upper().startswith(b"MGTLS OK")
        text = greeting[4:].lstrip()
        if text.startswith(b"[") and b"]" in text:
            text = text[text.index(b"]") + 1:].lstrip()
        replay = b"* OK " + text
    else:
        if not greeting.startswith(b"+OK"):
            raise TlsHandshakeError(f"greeting {greeting[:80]!r} instead of +OK")
        sock.sendall(b"STLS\r\n")
        answer = _read_line(sock, buffer)
        ok = answer.startswith(b"+OK")
        replay = greeting
    if not ok:
        raise TlsHandshakeError(f"STARTTLS refused: {answer[:80]!r}")
    if buffer:
        raise TlsHandshakeError("sent data after its STARTTLS answer")
    connection = wrap_client(sock, backend, timeout)
    connection.pushback = replay
    return connection


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def cert_names(cert) -> list[str]:
    """The DNS names and IP addresses of a certificate's subjectAltName."""
    from cryptography import x509
    if cert is None:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([n.lower() for n in san.get_values_for_type(x509.DNSName)] +
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def name_matches(cert, expected: str) -> bool:
    """RFC 6125: an IP must be an IP SAN; a host name a DNS SAN (one leftmost "*" label)."""
    expected = expected.lower().rstrip(".")
    if _is_ip(expected):
        return str(ipaddress.ip_address(expected)) in cert_names(cert)
    for name in cert_names(cert):
        if name == expected:
            return True
        if name.startswith("*.") and "." in expected and \
                expected.split(".", 1)[1] == name[2:]:
            return True
    return False
