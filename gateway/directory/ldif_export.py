"""LDIF directory exports (RFC 2849) → a stream of ExportEntry, parsed with the ``ldif``
library (folded lines, ``::`` base64 values, comments, DN syntax).

Each entry goes through the same attribute mapping as the LDAP source (mapping.py), so an
``ldapsearch -LLL`` dump of the directory, or an Active Directory ``ldifde`` export, warms the
cache exactly as an LDAP sync would.  Entries without a back-end or without a login name
(organizational units, groups, accounts without a mailbox) are passed over.

A malformed file raises ExportError naming the physical line: the library does not count
folded lines, so a counting reader notes where each record starts, and on an error the record
is parsed again one logical line at a time to find the line at fault.  A login name that two
entries claim is an error too (the reader keeps only the names' hashes and re-reads the file to
name the first entry).
"""
from __future__ import annotations

import re
from collections import deque
from typing import Iterator

import ldif

from ..config import DirectoryConfig
from .export import ExportEntry, ExportError
from .mapping import AttributeMap

MAX_RECORD_LINES = 100_000     # a record longer than this is not a directory entry
KEPT = ("dn", "changetype", "version")   # lines the library needs besides the mapped ones
LIBRARY_MESSAGES = {"subsection not found": "a line without ':' (expected 'attribute: value')"}


class _LineReader:
    """The file as the LDIF library reads it: counts physical lines, notes the line each
    record starts on, and leaves out the lines of attributes the mapping does not use.

    A directory export carries dozens of attributes per entry and the gateway needs three
    to five: dropping the others by name before the library decodes them makes a warm-up
    several times faster.  Their values are then never checked (a broken jpegPhoto does
    not stop a sync); names and the lines kept are left to the library.
    """

    def __init__(self, handle, wanted: set[str]):
        self.next_line = handle.readline
        names = b"|".join(re.escape(name.encode()) for name in sorted(wanted))
        self.wanted_line = re.compile(rb"(?:%b)(?:;[^:]*)?:" % names, re.IGNORECASE).match
        self.number = 0
        self.in_record = False
        self.skipping = False
        self.starts: deque[int] = deque()

    def readline(self) -> bytes:
        while True:
            line = self.next_line()
            if not line:
                return line
            self.number += 1
            first = line[0]
            if first == 32:                             # " ": a folded continuation
                if self.skipping:
                    continue
                return line
            self.skipping = False
            if first == 10 or first == 13:              # a blank line ends a record
                self.in_record = False
            elif first != 35:                           # "#": a comment
                if not self.in_record:
                    self.in_record = True
                    self.starts.append(self.number)
                elif not self.wanted_line(line) and b":" in line:   # no ":": the library
                    self.skipping = True                            # reports it
                    continue
            return line


def iter_ldif(path: str, directory: DirectoryConfig) -> Iterator[ExportEntry]:
    """Stream the entries of an LDIF export, one ExportEntry per login name.

    ``ExportEntry.line`` is the line the entry's record starts on.  Raises ExportError for an
    unreadable file, LDIF syntax errors, change records (``changetype:``) and a login name
    claimed by two entries; entries before the error have been yielded already.
    """
    attribute_map = AttributeMap(directory)
    seen_hashes: set[int] = set()
    for line, dn, attributes in _records(path, set(attribute_map.attributes)):
        mailbox = attribute_map.mailbox(dn, attributes)
        if mailbox is None:
            continue
        for login in mailbox.login_names:
            login_hash = hash(login)
            if login_hash in seen_hashes:
                first = _first_entry_of(path, attribute_map, login, line)
                if first is not None:
                    raise ExportError(path, line, f"duplicate login {login!r} "
                                                  f"(first in the entry on line {first})")
            seen_hashes.add(login_hash)
            yield ExportEntry(line, login, mailbox.backend, mailbox.backend_login,
                              mailbox.mailbox_id)


def _records(path: str, wanted: set[str], stop_at: int | None = None
             ) -> Iterator[tuple[int, str, dict]]:
    """(start line, dn, the ``wanted`` attributes with lower-case names) of each record."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    with handle:
        reader = _LineReader(handle, {*wanted, *KEPT})
        records = ldif.LDIFParser(reader, encoding="utf8").parse()
        while True:
            try:
                dn, entry = next(records)
            except StopIteration:
                return
            except ValueError as exc:   # binascii.Error, UnicodeError: ValueError too
                start = reader.starts.popleft() if reader.starts else reader.number
                reason = LIBRARY_MESSAGES.get(str(exc), str(exc))
                raise ExportError(path, _fault_line(path, start, reader.wanted_line),
                                  f"bad LDIF: {reason}") from None
            except OSError as exc:
                raise ExportError(path, reader.number, f"cannot read: {exc.strerror}") from None
            start = reader.starts.popleft() if reader.starts else reader.number
            if stop_at is not None and start >= stop_at:
                return
            if dn is None and not entry:
                continue   # "version: 1" alone
            yield start, dn, _attributes(path, start, entry, wanted)


def _attributes(path: str, line: int, entry: dict, wanted: set[str]) -> dict:
    attributes: dict[str, list] = {}
    for name, values in entry.items():
        name = name.lower()
        if name not in wanted:
            name = name.partition(";")[0]       # "objectGUID;binary" → "objectguid"
            if name not in wanted:
                if name == "changetype":
                    break
                continue
        attributes.setdefault(name, []).extend(values)
    if "changetype" in (n.lower() for n in entry):
        raise ExportError(path, line, "LDIF change records (changetype:) are not a directory "
                                      "export; export the entries themselves")
    return attributes


def _fault_line(path: str, start: int, wanted_line) -> int:
    """The physical line at fault in the record starting on ``start``: the record is parsed
    again with one more logical line (a line and its folded continuations) each time,
    leaving out the attributes the reader left out."""
    logical: list[tuple[int, bytes]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if number < start:
                continue
            if not line.strip(b"\r\n") or number - start > MAX_RECORD_LINES:
                break
            if line[:1] == b" " and logical:
                logical[-1] = (logical[-1][0], logical[-1][1] + line)
            else:
                logical.append((number, line))
    logical = [(number, text) for index, (number, text) in enumerate(logical)
               if index == 0 or text[:1] == b"#" or wanted_line(text) or b":" not in text]
    for count in range(1, len(logical) + 1):
        chunk = b"".join(text for _, text in logical[:count])
        try:
            for _ in ldif.LDIFParser(_BytesLines(chunk)).parse():
                pass
        except ValueError:
            return logical[count - 1][0]
    return start


class _BytesLines:
    def __init__(self, data: bytes):
        self.lines = iter(data.splitlines(keepends=True))

    def readline(self) -> bytes:
        return next(self.lines, b"")


def _first_entry_of(path: str, attribute_map: AttributeMap, login: str,
                    before_line: int) -> int | None:
    """The start line of the first entry before ``before_line`` that has ``login``."""
    for line, dn, attributes in _records(path, set(attribute_map.attributes), before_line):
        mailbox = attribute_map.mailbox(dn, attributes)
        if mailbox is not None and login in mailbox.login_names:
            return line
    return None
