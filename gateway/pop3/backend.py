"""The back-end half of a POP3 login: greeting, CAPA, XCLIENT, the replayed login.

Every line sent here is built by the gateway.  The login goes as SASL PLAIN (RFC 5034) when
the back-end offers it: base64 carries any byte safely.  USER/PASS is the fallback, and only
for credentials without CR, LF or NUL, so a client cannot append a second command.
"""
from __future__ import annotations

import socket

from gateway import sasl
from gateway.session import Failure, LoginError

MAX_LINE = 8192
MAX_CAPA_LINES = 100

# RFC 2449 / RFC 3206 response codes on a failed login → how it failed.
ERR_CODES = {"SYS/TEMP": Failure.UNAVAILABLE, "IN-USE": Failure.UNAVAILABLE,
             "LOGIN-DELAY": Failure.UNAVAILABLE, "SYS/PERM": Failure.UNAVAILABLE,
             "AUTH": Failure.AUTH_FAILED}


class LineTooLong(ValueError):
    """A line longer than the reader's bound; it was read to its end and dropped."""


class LineReader:
    """Bounded CRLF line reading from a socket whose timeout is already set.

    Memory stays bounded: an over-long line is discarded as it arrives, up to its LF, and
    then reported (LineTooLong), so the reader is in step with the peer's next line.
    """

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE):
        self.sock = sock
        self.max_line = max_line
        self.buffer = bytearray()
        self.discarding = False

    def read_line(self) -> bytes | None:
        """One line without its CRLF; None at EOF.

        Raises OSError, socket.timeout, and LineTooLong for a line above ``max_line`` octets
        (LF included).
        """
        while True:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self.buffer[:newline + 1])
                del self.buffer[:newline + 1]
                if self.discarding or len(line) > self.max_line:
                    self.discarding = False
                    raise LineTooLong(f"line longer than {self.max_line} octets")
                return line.rstrip(b"\r\n")
            if len(self.buffer) > self.max_line:
                self.discarding = True
                self.buffer.clear()
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buffer += data

    def take(self) -> bytes:
        """Bytes read past the last line (handed to the relay)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class Pop3Backend:
    def __init__(self, sock: socket.socket, name: str, timeout: float):
        self.sock = sock
        self.name = name
        self.reader = LineReader(sock)
        self.capabilities: set[str] = set()
        sock.settimeout(timeout)

    def _fail(self, failure: Failure, detail: str) -> LoginError:
        return LoginError(failure, f"backend {self.name}: {detail}")

    def read_line(self) -> bytes:
        try:
            line = self.reader.read_line()
        except socket.timeout:
            raise self._fail(Failure.UNAVAILABLE, "timed out") from None
        except OSError as exc:
            raise self._fail(Failure.UNAVAILABLE, f"read error: {exc.strerror or exc}") from None
        except ValueError:
            raise self._fail(Failure.PROTOCOL, "answer line too long") from None
        if line is None:
            raise self._fail(Failure.UNAVAILABLE, "closed the connection")
        return line

    def send(self, line: bytes) -> None:
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise self._fail(Failure.UNAVAILABLE, f"write error: {exc.strerror or exc}") from None

    def greet(self) -> None:
        greeting = self.read_line()
        if not greeting.startswith(b"+OK"):
            raise self._fail(Failure.UNAVAILABLE, f"greeting {greeting[:80]!r}")
        if greeting.startswith(b"+OK [XCLIENT]"):
            # Dovecot announces XCLIENT to trusted networks in its greeting, not in CAPA.
            self.capabilities.add("XCLIENT")
        self.send(b"CAPA\r\n")
        if self.read_line().startswith(b"+OK"):
            for _ in range(MAX_CAPA_LINES):
                line = self.read_line()
                if line == b".":
                    break
                self.capabilities.add(line.decode("ascii", "replace").upper())

    def offers_plain(self) -> bool:
        return any(c.startswith("SASL ") and "PLAIN" in c.split() for c in self.capabilities)

    def forward_client(self, address: str, port: int, session_id: str) -> None:
        """Dovecot's XCLIENT (trusted networks only): the back-end logs the real client."""
        if not any(c.startswith("XCLIENT") for c in self.capabilities):
            return
        if not _safe_token(address):
            return
        self.send(f"XCLIENT ADDR={address} PORT={int(port)} SESSION={session_id}\r\n".encode())
        answer = self.read_line()
        if not answer.startswith(b"+OK"):
            raise self._fail(Failure.UNAVAILABLE, f"XCLIENT refused: {answer[:80]!r}")

    def login(self, login_name: str, password: str) -> bytes:
        """Replay the login; returns the +OK line or raises LoginError."""
        if self.offers_plain():
            token = sasl.encode_plain(login_name, password)
            self.send(b"AUTH PLAIN " + token + b"\r\n")
            return self._answer(self.read_line())
        if not _safe_token(login_name, spaces=True) or not _safe_token(password, spaces=True):
            raise self._fail(Failure.AUTH_FAILED, "credentials unusable with USER/PASS")
        user = b"USER " + login_name.encode() + b"\r\n"
        secret = b"PASS " + password.encode() + b"\r\n"
        if "PIPELINING" in self.capabilities:
            self.send(user + secret)
            user_answer = self.read_line()
        else:
            self.send(user)
            user_answer = self.read_line()
            if user_answer.startswith(b"+OK"):
                self.send(secret)
        if not user_answer.startswith(b"+OK"):
            if "PIPELINING" in self.capabilities:
                self.read_line()
            return self._answer(user_answer)
        return self._answer(self.read_line())

    def _answer(self, line: bytes) -> bytes:
        if line.startswith(b"+OK"):
            return line
        code = ""
        if line.startswith(b"-ERR ["):
            code = line[6:line.find(b"]")].decode("ascii", "replace").upper()
        failure = ERR_CODES.get(code, Failure.AUTH_FAILED)
        raise self._fail(failure, f"login answer {line[:120]!r}")


def _safe_token(value: str, spaces: bool = False) -> bool:
    """No byte that could end a POP3 command line (CR, LF, NUL) nor other controls."""
    forbidden = set(range(0x20)) | {0x7f}
    if not spaces:
        forbidden.add(0x20)
    return bool(value) and not any(ord(ch) in forbidden for ch in value)
