"""Helpers for the operations tests: scrape /metrics, clients bound to a source address,
polling."""
from __future__ import annotations

import imaplib
import poplib
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until  # noqa: F401 - re-exported to the ops tests


def scrape_text(gateway) -> str:
    url = f"http://127.0.0.1:{gateway.ports['health']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def scrape(gateway) -> dict:
    """{(sample name, frozenset(labels.items())): value} of one /metrics answer."""
    samples = {}
    for family in text_string_to_metric_families(scrape_text(gateway)):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


class BoundImap(imaplib.IMAP4):
    """imaplib from a chosen source address (127.0.0.2 is loopback too on Linux)."""

    def __init__(self, host, port, source: str, timeout: float = 10):
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def imap_from(gateway, source: str = "127.0.0.1") -> imaplib.IMAP4:
    return BoundImap("127.0.0.1", gateway.imap_port, source)


def try_login(gateway, user: str, password: str, source: str = "127.0.0.1"):
    """(client or None, the tagged answer's text) of one IMAP LOGIN."""
    client = imap_from(gateway, source)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        client.shutdown()
        return None, str(exc)
    return client, "OK"


def pop_login(gateway, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", gateway.pop3_port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client
