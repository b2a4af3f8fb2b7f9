"""IMAP URLs (RFC 5092, and the RFC 2192 URLs older servers still send) and modified UTF-7.

Pure and stdlib only.  The gateway meets IMAP URLs in two places: RFC 2221 login referrals
(``NO [REFERRAL imap://user;AUTH=*@host/]``) and RFC 2193 mailbox referrals
(``NO [REFERRAL imap://user;AUTH=*@host/shared/news]``).  :func:`parse_url` keeps what a
referral follower needs (host, port, user, mechanism, mailbox, UIDVALIDITY) and refuses
anything that is not an ``imap://`` URL with a :class:`ValueError` whose text is a short reason.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass

__all__ = ["ImapUrl", "parse_url", "parse_referral", "format_url",
           "mutf7_encode", "mutf7_decode"]

DEFAULT_PORT = 143
MAX_URL_LENGTH = 8192   # a bound on work per URL; referral codes come from a back-end's line

# RFC 3986 §2: never allowed anywhere in a URI (besides CTLs, SP and non-ASCII, checked first).
_NEVER_IN_URI = set('"<>\\^`{|}')
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_HOST_NAME = re.compile(r"[A-Za-z0-9._~-]+")          # reg-name / IPv4address, no %-escapes
_AUTH_TYPE = re.compile(r"[A-Za-z0-9._~!$'()*+,&=-]+")  # RFC 5092 enc-auth-type, decoded
_NZ_NUMBER = re.compile(r"[1-9][0-9]{0,9}")
# After the mailbox: ";UIDVALIDITY=n", then "/;UID=n", "/;SECTION=..", "/;PARTIAL=..",
# ";EXPIRE=..", ";URLAUTH=.." (RFC 5092 §3 and §6), then "?search".
_PARAM = re.compile(r"(/?);([A-Za-z]+)=([^;/?]*)")


@dataclass(frozen=True, slots=True)
class ImapUrl:
    host: str                    # lower-cased; an IPv6 address without brackets
    port: int = DEFAULT_PORT
    user: str | None = None      # %-decoded
    auth: str | None = None      # upper-cased mechanism, "*" for any, None when absent
    mailbox: str | None = None   # a Unicode name; None when the URL has no mailbox
    uidvalidity: int | None = None


def parse_url(text: str) -> ImapUrl:
    """Parse an ``imap://`` URL (RFC 5092 §6 ``imapurl``; RFC 2192 forms too).

    ``imap://[enc-user][;AUTH=(*|enc-auth-type)]@host[:port]/[enc-mailbox][;UIDVALIDITY=n]
    [/;UID=n[/;SECTION=s][/;PARTIAL=p]][?search]``.  The scheme and parameter names are
    case-insensitive.  %-escapes are decoded; the mailbox is UTF-8 (RFC 5092 §3.4), or
    modified UTF-7 when its decoded text is canonical modified UTF-7 with an ``&`` in it
    (RFC 2192 §3.3 URLs, and servers that copy their wire names into URLs).  UID, SECTION,
    PARTIAL, search and URLAUTH parts are checked for shape and dropped.  Anything else,
    and any malformed part, raises ValueError with a short reason.
    """
    if not isinstance(text, str):
        raise ValueError("not a string")
    if len(text) > MAX_URL_LENGTH:
        raise ValueError("URL too long")
    for char in text:
        if char <= " " or char >= "\x7f" or char in _NEVER_IN_URI:
            raise ValueError(f"character {char!r} not allowed in a URL")
    if "#" in text:
        raise ValueError("fragment not allowed in an imap URL")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "imap":
        raise ValueError("not an imap:// URL")
    authority, slash, path = rest.partition("/")
    if "?" in authority:   # RFC 5092: a search needs a mailbox, hence a "/"
        raise ValueError("query without a mailbox")
    user, auth, host, port = _parse_server(authority)
    mailbox, uidvalidity = _parse_path(path) if slash else (None, None)
    return ImapUrl(host, port, user, auth, mailbox, uidvalidity)


def parse_referral(code_text: str) -> list[ImapUrl]:
    """The URLs of a ``[REFERRAL url ...]`` response code's text, in the server's order.

    RFC 2193 §4 lets a referral name several replicas, best first; a URL that does not
    parse is skipped (the others may still be usable).  ValueError when none parses.
    """
    urls, reasons = [], []
    for word in code_text.split():
        try:
            urls.append(parse_url(word))
        except ValueError as exc:
            reasons.append(f"{word[:60]!r}: {exc}")
    if not urls:
        raise ValueError("no imap URL in referral" + (f" ({'; '.join(reasons[:3])})"
                                                      if reasons else ""))
    return urls


def format_url(url: ImapUrl) -> str:
    """The RFC 5092 text of ``url`` (mailbox %-encoded as UTF-8); parse_url reads it back
    (a mailbox holding "&" may read back differently: see parse_url's mUTF-7 rule)."""
    userinfo = ""
    if url.user is not None:
        userinfo = _quote(url.user.encode(), "")
    if url.auth is not None:
        userinfo += ";AUTH=" + (url.auth if url.auth == "*" else _quote(url.auth.encode(), ""))
    host = f"[{url.host}]" if ":" in url.host else url.host
    text = f"imap://{userinfo + '@' if userinfo else ''}{host}"
    if url.port != DEFAULT_PORT:
        text += f":{url.port}"
    text += "/"
    if url.mailbox:
        path = _quote(url.mailbox.encode(), "/")
        if path.endswith("/"):   # "a/;UIDVALIDITY=" would read as "a" then "/;..."
            path = path[:-1] + "%2F"
        text += path
        if url.uidvalidity is not None:
            text += f";UIDVALIDITY={url.uidvalidity}"
    return text


# --------------------------------------------------------------------------- URL parts

def _parse_server(authority: str) -> tuple[str | None, str | None, str, int]:
    """``[iuserinfo "@"] host [":" port]`` → (user, auth, host, port)."""
    # rpartition: a server that forgets to escape "@" in a user name is still understood.
    userinfo, at, hostport = authority.rpartition("@")
    user = auth = None
    if at:
        user_text, semi, param = userinfo.partition(";")
        if semi:
            if param[:5].upper() != "AUTH=":
                raise ValueError("unknown parameter in user info")
            auth = _parse_auth(param[5:])
        if user_text:
            user = _utf8(_unquote(user_text), "user name")
        elif auth is None:
            raise ValueError("empty user info")
    host, port = _parse_hostport(hostport)
    return user, auth, host, port


def _parse_auth(text: str) -> str:
    if text == "*":
        return "*"
    if not text:
        raise ValueError("empty AUTH mechanism")
    mechanism = _unquote(text).decode("ascii", errors="replace")
    if not _AUTH_TYPE.fullmatch(mechanism):
        raise ValueError("bad AUTH mechanism")
    return mechanism.upper()


def _parse_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("unterminated IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(text[1:close]))
        except ValueError:
            raise ValueError("bad IPv6 address") from None
        rest = text[close + 1:]
    else:
        host = text.partition(":")[0]
        rest = text[len(host):]
        if not host:
            raise ValueError("missing host")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError("bad host name")
        host = host.lower()
    if not rest:
        return host, DEFAULT_PORT
    if not rest.startswith(":"):
        raise ValueError("bad host")
    port_text = rest[1:]
    if port_text == "":
        return host, DEFAULT_PORT   # RFC 3986 §3.2.3: an empty port means the default
    if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
        raise ValueError("bad port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    return host, port


def _parse_path(path: str) -> tuple[str | None, int | None]:
    """``[enc-mailbox [;UIDVALIDITY=n] [iuid ...] [?search]]`` → (mailbox, uidvalidity)."""
    stop = min((i for i in (path.find(";"), path.find("?")) if i >= 0), default=len(path))
    encoded, tail = path[:stop], path[stop:]
    if tail.startswith(";") and encoded.endswith("/"):
        encoded = encoded[:-1]   # the "/" of "/;UID=", not part of the mailbox
        tail = "/" + tail
    if not encoded:
        if tail:
            raise ValueError("missing mailbox")
        return None, None
    mailbox = _decode_mailbox(_unquote(encoded))
    return mailbox, _parse_tail(tail)


def _parse_tail(tail: str) -> int | None:
    """Check the parts after the mailbox; return the UIDVALIDITY, if any."""
    tail, question, search = tail.partition("?")
    uidvalidity = None
    pos = 0
    while pos < len(tail):
        match = _PARAM.match(tail, pos)
        if match is None:
            raise ValueError("unexpected text after the mailbox")
        slash, name, value = match.group(1), match.group(2).upper(), match.group(3)
        if name == "UIDVALIDITY":
            if pos != 0 or slash:
                raise ValueError("UIDVALIDITY must follow the mailbox")
            uidvalidity = _nz_number(value, "UIDVALIDITY")
        elif name == "UID":
            if not slash:
                raise ValueError("UID must follow a '/'")
            _nz_number(value, "UID")
        _unquote(value)   # every part must at least be well %-encoded
        pos = match.end()
    if question:
        if not search:
            raise ValueError("empty search")
        _unquote(search)
    return uidvalidity


def _nz_number(text: str, what: str) -> int:
    if not _NZ_NUMBER.fullmatch(text) or int(text) > 0xFFFFFFFF:
        raise ValueError(f"bad {what}")
    return int(text)


def _decode_mailbox(raw: bytes) -> str:
    name = _utf8(raw, "mailbox")
    if "&" in name and name.isascii():
        try:
            return mutf7_decode(name)   # RFC 2192 §3.3 / a server's wire name
        except ValueError:
            pass
    return name


def _unquote(text: str) -> bytes:
    """%-decode (RFC 3986 §2.1) to bytes; ValueError on a "%" without two hex digits."""
    if "%" not in text:
        return text.encode("ascii")
    out = bytearray()
    pos = 0
    while True:
        percent = text.find("%", pos)
        if percent < 0:
            out += text[pos:].encode("ascii")
            return bytes(out)
        match = _PCT.match(text, percent)
        if match is None:
            raise ValueError("bad %-escape")
        out += text[pos:percent].encode("ascii")
        out.append(int(match.group(1), 16))
        pos = match.end()


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                  b"-._~!$'()*+,&=:")   # RFC 5092 achar / bchar minus "@", "/" unless asked


def _quote(raw: bytes, extra_safe: str) -> str:
    safe = _SAFE | frozenset(extra_safe.encode())
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in raw)


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


# ----------------------------------------------------------------------- modified UTF-7

def mutf7_encode(name: str) -> str:
    """RFC 3501 §5.1.3: printable ASCII stands for itself ("&" as "&-"), every other run of
    characters is UTF-16BE in modified BASE64 ("," for "/", no padding) between "&" and "-".
    A lone surrogate (not encodable as UTF-16) raises ValueError."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            utf16 = "".join(run).encode("utf-16-be")   # UnicodeEncodeError is a ValueError
            out.append("&" + base64.b64encode(utf16).decode().rstrip("=").replace("/", ",")
                       + "-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


_MUTF7_TOKEN = re.compile(r"&([A-Za-z0-9+,]*)-|([\x20-\x25\x27-\x7e]+)")


def mutf7_decode(name: str) -> str:
    """The Unicode name for a modified UTF-7 mailbox name (RFC 3501 §5.1.3).

    ValueError when the text is not what a conforming encoder produces: a character
    outside printable ASCII, an unterminated or bad BASE64 run, non-zero padding bits,
    broken UTF-16, printable ASCII or "&" inside a run, or two runs back to back.
    """
    out: list[str] = []
    pos = 0
    after_run = False
    while pos < len(name):
        match = _MUTF7_TOKEN.match(name, pos)
        if match is None:
            raise ValueError("malformed modified UTF-7")
        pos = match.end()
        if match.group(2) is not None:
            out.append(match.group(2))
            after_run = False
            continue
        encoded = match.group(1)
        if not encoded:
            out.append("&")
            after_run = False
            continue
        if after_run:
            raise ValueError("adjacent modified BASE64 runs")
        out.append(_decode_run(encoded))
        after_run = True
    return "".join(out)


def _decode_run(encoded: str) -> str:
    if len(encoded) % 4 == 1:
        raise ValueError("truncated modified BASE64")
    padded = encoded.replace(",", "/") + "=" * (-len(encoded) % 4)
    raw = base64.b64decode(padded, validate=True)
    if len(raw) % 2:
        raise ValueError("odd UTF-16 length in modified BASE64")
    # Canonical form: unused bits are zero, so re-encoding gives back the same characters.
    if base64.b64encode(raw).decode().rstrip("=").replace("/", ",") != encoded:
        raise ValueError("non-zero padding bits in modified BASE64")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise ValueError("broken UTF-16 in modified UTF-7") from None
    if any(" " <= char <= "~" for char in text):
        raise ValueError("printable ASCII inside modified BASE64")
    return text
