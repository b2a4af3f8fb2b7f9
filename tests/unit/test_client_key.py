"""gateway/limits.client_key: which client a limit counts for an address."""
import pytest

from gateway.limits import client_key


@pytest.mark.parametrize("address,prefix,key", [
    ("192.0.2.1", 64, "192.0.2.1"),                          # IPv4: the address itself
    ("2001:db8:1:2::5", 64, "2001:db8:1:2::/64"),            # one subscriber's /64
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:3::5", 64, "2001:db8:1:3::/64"),            # the next /64: another client
    ("2001:db8:1:2::5", 48, "2001:db8:1::/48"),              # Dovecot's auth penalty grouping
    ("2001:db8:1:2::5", 128, "2001:db8:1:2::5"),             # every address apart
    ("2001:DB8:1:2:0:0:0:5", 128, "2001:db8:1:2::5"),        # one spelling per address
    ("::ffff:192.0.2.7", 64, "192.0.2.7"),                   # dual-stack listener: IPv4
    ("fe80::1%eth0", 64, "fe80::/64"),                       # a zone is no part of the key
    ("/run/mailgate.sock", 64, "/run/mailgate.sock"),        # not an IP address: as it is
])
def test_client_key(address, prefix, key):
    assert client_key(address, prefix) == key
