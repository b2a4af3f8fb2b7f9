"""Config honesty for TLS, PROXY and health keys: defaults, and every unworkable value
rejected with file, key and reason."""
from __future__ import annotations

import pytest

from gateway import config as gateway_config

TLS = {"cert_file": "c.pem", "key_file": "k.pem"}


def parse(listen: list, tls: dict | None = None, backends: dict | None = None):
    raw = {"listen": listen}
    if tls is not None:
        raw["tls"] = tls
    if backends is not None:
        raw["backends"] = backends
    return gateway_config.parse(raw, "gw.toml")


def test_require_tls_for_login_defaults_by_address():
    config = parse([{"protocol": "imap", "address": "127.0.0.1:1", "tls": "starttls"},
                    {"protocol": "imap", "address": "0.0.0.0:2", "tls": "starttls"},
                    {"protocol": "imap", "address": "[::1]:3"},
                    {"protocol": "health", "address": "0.0.0.0:4"}], TLS)
    assert [l.require_tls_for_login for l in config.listen] == [False, True, False, False]
    assert config.listen[0].proxy_trusted == ("127.0.0.0/8", "::1/128")
    assert config.tls.min_version == "1.2" and config.tls.session_tickets


def test_sni_certificates_parse():
    config = parse([{"protocol": "imap", "address": "127.0.0.1:1", "tls": "implicit"}],
                   {**TLS, "certificates": [{"cert_file": "o.pem", "key_file": "o.key",
                                             "server_names": ["*.example.org"]}]})
    assert config.tls.certificates[0].server_names == ("*.example.org",)


PLAIN = {"protocol": "imap", "address": "127.0.0.1:1"}


@pytest.mark.parametrize("listen, tls, backends, message", [
    ([{"protocol": "imap", "address": "0.0.0.0:1"}], None, None,
     "gw.toml: listen[0].require_tls_for_login: defaults to true off loopback but tls = \"none\""),
    ([{**PLAIN, "require_tls_for_login": True}], None, None,
     "gw.toml: listen[0].require_tls_for_login: is on but tls = \"none\""),
    ([{**PLAIN, "tls": "implicit"}], None, None, "gw.toml: tls.cert_file: TLS listeners need"),
    ([{**PLAIN, "proxy_trusted": ["10.0.0.0/33"]}], None, None,
     "gw.toml: listen[0].proxy_trusted: '10.0.0.0/33' is not a CIDR"),
    ([{"protocol": "health", "address": "127.0.0.1:1", "tls": "implicit"}], TLS, None,
     "gw.toml: listen[0].tls: the health listener is plain HTTP"),
    ([{"protocol": "health", "address": "127.0.0.1:1", "proxy_protocol": True}], None, None,
     "gw.toml: listen[0].proxy_protocol: not supported on the health listener"),
    ([{**PLAIN, "protocol": "smtp"}], None, None, "gw.toml: listen[0].protocol: must be one of"),
    ([PLAIN], {**TLS, "min_version": "1.1"}, None, "gw.toml: tls.min_version: must be"),
    ([PLAIN], {**TLS, "certificates": [{"cert_file": "o.pem", "key_file": "o.key"}]}, None,
     "gw.toml: tls.certificates[0].server_names: name at least one"),
    ([PLAIN], {"certificates": [{"cert_file": "o", "key_file": "k", "server_names": ["x"]}]},
     None, "gw.toml: tls.cert_file: [[tls.certificates]] need a default certificate"),
    ([PLAIN], {**TLS, "ciphersuites": "x"}, None, "gw.toml: tls.ciphersuites: unknown key"),
    ([PLAIN], None, {"A": {"address": "h", "tls": "always"}}, "gw.toml: backends.A.tls: must be"),
    ([PLAIN], None, {"A": {"address": "h", "tls_ca_file": "ca.pem"}},
     "gw.toml: backends.A.tls_ca_file: needs tls"),
])
def test_config_errors(listen, tls, backends, message):
    with pytest.raises(gateway_config.ConfigError) as caught:
        parse(listen, tls, backends)
    assert str(caught.value).startswith(message)


def test_check_rejects_unreadable_backend_ca(tmp_path):
    from gateway import tls
    config = parse([PLAIN], None, {"A": {"address": "h", "tls": "implicit",
                                         "tls_ca_file": str(tmp_path / "none.pem")}})
    with pytest.raises(tls.TlsError, match="backends.A.tls_ca_file: .*cannot read"):
        tls.check(config)


def test_check_rejects_a_bad_cipher_list(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from certs import TestCA

    from gateway import tls
    cert, key = TestCA(tmp_path).issue("gw", ["localhost"])
    config = parse([{**PLAIN, "tls": "implicit"}],
                   {"cert_file": str(cert), "key_file": str(key), "ciphers": "NOPE"})
    with pytest.raises(tls.TlsError, match="tls.ciphers: no cipher match"):
        tls.check(config)
