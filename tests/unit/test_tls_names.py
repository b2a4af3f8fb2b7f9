"""Back-end certificate name checks (RFC 6125 subset) and SNI certificate choice."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from certs import TestCA  # noqa: E402

from gateway import tls  # noqa: E402


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    path, _ = TestCA(tmp_path_factory.mktemp("ca")).issue(
        "names", ["mail.example.com", "*.store.example.com", "10.1.2.3", "::1"])
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("name, matches", [
    ("mail.example.com", True), ("MAIL.example.com.", True), ("a.store.example.com", True),
    ("store.example.com", False), ("a.b.store.example.com", False), ("example.com", False),
    ("10.1.2.3", True), ("::1", True), ("0:0::1", True), ("10.1.2.4", False),
    ("mail.example.org", False),
])
def test_name_matches(cert, name, matches):
    assert tls.name_matches(cert, name) is matches


def test_cert_names(cert):
    assert tls.cert_names(cert) == ["mail.example.com", "*.store.example.com", "10.1.2.3", "::1"]
