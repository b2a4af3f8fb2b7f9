"""Tables of IMAP URLs (RFC 5092 / RFC 2192) and modified UTF-7 names (RFC 3501 §5.1.3),
plus hypothesis on arbitrary text, for gateway.imap.urls."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.imap.urls import (
    ImapUrl, format_url, mutf7_decode, mutf7_encode, parse_referral, parse_url,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ parse_url

GOOD_URLS = [
    # Dovecot 2.3's real login referral (passdb "referral=y host=... port=...").
    ("imap://mover%40example.com;AUTH=PLAIN@127.0.0.1:9999/",
     ImapUrl("127.0.0.1", 9999, "mover@example.com", "PLAIN")),
    # RFC 2193's example shape: scheme and host case-folded, %2F inside the mailbox.
    ("IMAP://user;AUTH=*@Host.Example.com/public%2Fnews",
     ImapUrl("host.example.com", 143, "user", "*", "public/news")),
    ("imap://h/INBOX;UIDVALIDITY=385759045/;UID=20",
     ImapUrl("h", mailbox="INBOX", uidvalidity=385759045)),
    ("imap://[::1]:1143/", ImapUrl("::1", 1143)),
    ("imap://[2001:DB8::1]/", ImapUrl("2001:db8::1")),
    ("imap://h/&AOQ-pfel", ImapUrl("h", mailbox="äpfel")),             # RFC 2192: mUTF-7
    ("imap://h/%C3%A4pfel", ImapUrl("h", mailbox="äpfel")),            # RFC 5092: UTF-8
    ("imap://h/%26AOQ-pfel", ImapUrl("h", mailbox="äpfel")),           # escaped "&" too
    ("imap://h/Foo&Bar", ImapUrl("h", mailbox="Foo&Bar")),             # not valid mUTF-7
    ("imap://h/Tom&-Jerry", ImapUrl("h", mailbox="Tom&Jerry")),        # valid mUTF-7
    ("imap://h/Caf%C3%A9&Bar", ImapUrl("h", mailbox="Café&Bar")),      # UTF-8 wins
    ("imap://h/~peter/mail/&U,BTFw-/&ZeVnLIqe-",                        # RFC 3501 §5.1.3
     ImapUrl("h", mailbox="~peter/mail/台北/日本語")),
    ("imap://h", ImapUrl("h")),
    ("imap://h/", ImapUrl("h")),
    ("imap://h:/", ImapUrl("h")),                                      # RFC 3986: empty port
    ("imap://h:993", ImapUrl("h", 993)),
    ("imap://u@h/", ImapUrl("h", user="u")),
    ("imap://;AUTH=GSSAPI@h/", ImapUrl("h", auth="GSSAPI")),
    ("imap://fred;auth=digest-md5@h/", ImapUrl("h", user="fred", auth="DIGEST-MD5")),
    ("imap://mover@example.com@h/", ImapUrl("h", user="mover@example.com")),   # lenient
    ("imap://h/INBOX/;UID=20", ImapUrl("h", mailbox="INBOX")),
    ("imap://h/a/b/;UID=20/;SECTION=1.2/;PARTIAL=0.1024",
     ImapUrl("h", mailbox="a/b")),
    ("imap://h/INBOX?SUBJECT%20%22x%22", ImapUrl("h", mailbox="INBOX")),
    ("imap://h/INBOX;UIDVALIDITY=7?ALL", ImapUrl("h", mailbox="INBOX", uidvalidity=7)),
    ("imap://h/INBOX;uidvalidity=4294967295", ImapUrl("h", mailbox="INBOX",
                                                      uidvalidity=4294967295)),
    ("imap://h/a%20b", ImapUrl("h", mailbox="a b")),
    ("imap://h/Sent/;UID=1;EXPIRE=2030-01-01T00:00:00Z;URLAUTH=anonymous",
     ImapUrl("h", mailbox="Sent")),
    ("imap://HOST-1.example.COM:143/", ImapUrl("host-1.example.com")),
]


@pytest.mark.parametrize("text,expected", GOOD_URLS, ids=[t for t, _ in GOOD_URLS])
def test_parse_url(text, expected):
    assert parse_url(text) == expected


BAD_URLS = [
    ("http://h/", "not an imap"),
    ("imaps://h/", "not an imap"),
    ("imap:h/", "not an imap"),
    ("", "not an imap"),
    ("imap://", "missing host"),
    ("imap:///INBOX", "missing host"),
    ("imap://u@/", "missing host"),
    ("imap://h:abc/", "bad port"),
    ("imap://h:0/", "port out of range"),
    ("imap://h:65536/", "port out of range"),
    ("imap://h:123456/", "bad port"),
    ("imap://h:-1/", "bad port"),
    ("imap://h/%zz", "bad %-escape"),
    ("imap://h/a%2", "bad %-escape"),
    ("imap://u%g0@h/", "bad %-escape"),
    ("imap://h/%FF", "not UTF-8"),
    ("imap://%FF@h/", "not UTF-8"),
    ("imap://@h/", "empty user info"),
    ("imap://u;AUTH=@h/", "empty AUTH"),
    ("imap://u;FOO=x@h/", "unknown parameter"),
    ("imap://u;AUTH=a%20b@h/", "bad AUTH"),
    ("imap://[::1/", "unterminated IPv6"),
    ("imap://[zz::1]/", "bad IPv6"),
    ("imap://[::1]x/", "bad host"),
    ("imap://ho_st!/", "bad host name"),
    ("imap://h/a b", "not allowed"),
    ("imap://h/ä", "not allowed"),
    ("imap://h/a\r\n", "not allowed"),
    ("imap://h/a#frag", "fragment"),
    ("imap://h?x", "query without a mailbox"),
    ("imap://h/?ALL", "missing mailbox"),
    ("imap://h/;UID=3", "missing mailbox"),
    ("imap://h/INBOX?", "empty search"),
    ("imap://h/INBOX;UIDVALIDITY=0", "bad UIDVALIDITY"),
    ("imap://h/INBOX;UIDVALIDITY=x", "bad UIDVALIDITY"),
    ("imap://h/INBOX;UIDVALIDITY=4294967296", "bad UIDVALIDITY"),
    ("imap://h/INBOX/;UID=0", "bad UID"),
    ("imap://h/INBOX;UID=5", "UID must follow"),
    ("imap://h/INBOX/;UID=5;UIDVALIDITY=3", "UIDVALIDITY must follow"),
    ("imap://h/INBOX;UIDVALIDITY=3junk", "bad UIDVALIDITY"),
    ("imap://h/INBOX;UIDVALIDITY=3/junk", "unexpected text"),
    ("imap://h/INBOX;", "unexpected text"),
    ("imap://h/" + "a" * 9000, "too long"),
]


@pytest.mark.parametrize("text,reason", BAD_URLS, ids=[t[:40] for t, _ in BAD_URLS])
def test_parse_url_rejects(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_url(text)


def test_parse_url_rejects_non_text():
    with pytest.raises(ValueError):
        parse_url(b"imap://h/")    # type: ignore[arg-type]


# ------------------------------------------------------------------------- parse_referral

def test_referral_with_replicas_keeps_their_order():
    urls = parse_referral("imap://u;AUTH=*@b.example.com/shared/x "
                          "imap://u;AUTH=*@a.example.com:1143/shared/x")
    assert [(u.host, u.port, u.mailbox) for u in urls] == [
        ("b.example.com", 143, "shared/x"), ("a.example.com", 1143, "shared/x")]


def test_referral_skips_bad_urls_but_keeps_good_ones():
    urls = parse_referral("http://a/ imap://h:bad/ imap://c/INBOX  ")
    assert urls == [ImapUrl("c", mailbox="INBOX")]


def test_referral_single_dovecot_login_referral():
    assert parse_referral("imap://mover%40example.com;AUTH=PLAIN@127.0.0.1:9999/") == [
        ImapUrl("127.0.0.1", 9999, "mover@example.com", "PLAIN")]


@pytest.mark.parametrize("text", ["", "   ", "http://h/ ftp://x/", "imap:// imap://h:0/"])
def test_referral_without_usable_url(text):
    with pytest.raises(ValueError, match="no imap URL"):
        parse_referral(text)


# ---------------------------------------------------------------------------- format_url

@pytest.mark.parametrize("url,text", [
    (ImapUrl("h"), "imap://h/"),
    (ImapUrl("::1", 1143), "imap://[::1]:1143/"),
    (ImapUrl("127.0.0.1", 9999, "mover@example.com", "PLAIN"),
     "imap://mover%40example.com;AUTH=PLAIN@127.0.0.1:9999/"),
    (ImapUrl("h", user="u", auth="*", mailbox="public/äpfel"),
     "imap://u;AUTH=*@h/public/%C3%A4pfel"),
    (ImapUrl("h", mailbox="a b;c?d", uidvalidity=9), "imap://h/a%20b%3Bc%3Fd;UIDVALIDITY=9"),
    (ImapUrl("h", mailbox="a/", uidvalidity=9), "imap://h/a%2F;UIDVALIDITY=9"),
])
def test_format_url(url, text):
    assert format_url(url) == text
    assert parse_url(text) == url


# ------------------------------------------------------------------------ modified UTF-7

MUTF7 = [
    ("INBOX", "INBOX"),
    ("äpfel", "&AOQ-pfel"),
    ("Tom & Jerry", "Tom &- Jerry"),
    ("&", "&-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("😀", "&2D3eAA-"),                       # a surrogate pair
    ("a\tb", "a&AAk-b"),                      # controls are encoded too
    ("ää", "&AOQA5A-"),                       # one run, not two
    ("", ""),
]


@pytest.mark.parametrize("name,encoded", MUTF7)
def test_mutf7(name, encoded):
    assert mutf7_encode(name) == encoded
    assert mutf7_decode(encoded) == name


@pytest.mark.parametrize("encoded", [
    "&",            # unterminated shift
    "&AOQ",         # run without "-"
    "&AOQ-&AOQ-",   # null shift between runs (RFC 3501 §5.1.3)
    "&AGE-",        # printable ASCII "a" inside a run
    "&ACY-",        # "&" inside a run
    "&AOR-",        # non-zero padding bits
    "&A-",          # truncated BASE64
    "&AO-",         # odd UTF-16 length
    "&2AA-",        # lone high surrogate
    "&AOQ/-",       # "/" is "," in modified BASE64
    "&*-",
    "ä",            # 8-bit text is not modified UTF-7
    "a\tb",
])
def test_mutf7_decode_rejects(encoded):
    with pytest.raises(ValueError):
        mutf7_decode(encoded)


def test_mutf7_encode_rejects_lone_surrogate():
    with pytest.raises(ValueError):
        mutf7_encode("\ud800")


# ---------------------------------------------------------------------------- hypothesis

URL_ALPHABET = st.sampled_from(list("imapIMAP:/@;=*[]%?&-_.~,+!$'()#09afAFxUuIiDdVvLlTtYy ")
                               + ["%2F", "%40", "%C3%A4", "&AOQ-", ";AUTH=", ";UID=",
                                  ";UIDVALIDITY=", "/;", "imap://", "[::1]", ":143", "ä"])


@FAST
@given(st.text())
def test_parse_url_arbitrary_text_only_raises_value_error(text):
    try:
        url = parse_url(text)
    except ValueError:
        return
    assert isinstance(url, ImapUrl)


@FAST
@given(st.lists(URL_ALPHABET, max_size=30).map("".join))
def test_parse_url_url_like_text_only_raises_value_error(text):
    for candidate in (text, "imap://" + text):
        try:
            url = parse_url(candidate)
        except ValueError:
            continue
        assert url.host and url.host == url.host.lower()
        assert 0 < url.port < 65536
        assert url.auth is None or url.auth == url.auth.upper()


@FAST
@given(st.text())
def test_parse_referral_only_raises_value_error(text):
    try:
        urls = parse_referral(text)
    except ValueError:
        return
    assert urls and all(isinstance(url, ImapUrl) for url in urls)


@FAST
@given(st.text())
def test_mutf7_round_trip(name):
    encoded = mutf7_encode(name)
    assert all(" " <= char <= "~" for char in encoded)
    assert mutf7_decode(encoded) == name


@FAST
@given(st.text(alphabet=st.sampled_from(list("&-AOQa,+/0 ~\t")) | st.characters()))
def test_mutf7_decode_accepts_only_canonical_text(text):
    try:
        name = mutf7_decode(text)
    except ValueError:
        return
    assert mutf7_encode(name) == text


@FAST
@given(host=st.sampled_from(["h", "mail.example.com", "127.0.0.1", "::1", "2001:db8::5"]),
       port=st.integers(1, 65535),
       user=st.none() | st.text(min_size=1),
       auth=st.none() | st.sampled_from(["*", "PLAIN", "DIGEST-MD5", "X-FOO"]),
       mailbox=st.none() | st.text(min_size=1),
       uidvalidity=st.none() | st.integers(1, 2**32 - 1))
def test_format_then_parse_round_trip(host, port, user, auth, mailbox, uidvalidity):
    # A mailbox holding "&" may be read back as modified UTF-7 (see parse_url).
    assume(mailbox is None or "&" not in mailbox)
    url = ImapUrl(host, port, user, auth, mailbox, uidvalidity if mailbox else None)
    assert parse_url(format_url(url)) == url
