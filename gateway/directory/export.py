"""Directory export files → a stream of ExportEntry: CSV here, LDIF in ldif_export.py.

A CSV export has a header line naming at least ``login`` and ``backend``; ``backend_login``
and ``mailbox_id`` are optional, other columns are ignored, names are matched without regard
to case, and a UTF-8 byte-order mark is tolerated.  One row per login name: a mailbox with
several login names has several rows.  The ``backend`` column names a ``[backends.NAME]``
entry or a back-end's host name; the sync resolves it (this module knows nothing of config).

Entries are streamed.  To catch a login name listed twice without holding a million names,
the reader keeps only the names' hashes; when a hash repeats, it re-reads the file up to that
point to find the first occurrence (and so tells a true duplicate from a hash collision).
"""
from __future__ import annotations

import csv
from typing import Iterator, NamedTuple

from .records import normalize_login

REQUIRED_COLUMNS = ("login", "backend")
OPTIONAL_COLUMNS = ("backend_login", "mailbox_id")


class ExportError(Exception):
    """A problem in an export file; str() is "FILE:LINE: reason" (or "FILE: reason")."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class ExportEntry(NamedTuple):
    """One login name of one mailbox; ``login`` is already normalized (normalize_login)."""

    line: int
    login: str
    backend: str
    backend_login: str = ""
    mailbox_id: str = ""
    where: str = ""          # the entry's DN, for messages about LDAP entries


def iter_export(path: str, directory) -> Iterator[ExportEntry]:
    """Entries of an export file, the format chosen by its suffix (.ldif, else CSV);
    ``directory`` is the DirectoryConfig (default domain, LDIF attribute mapping)."""
    if path.lower().endswith(".ldif"):
        from .ldif_export import iter_ldif
        return iter_ldif(path, directory)
    return iter_csv(path, default_domain=directory.default_domain)


def iter_csv(path: str, *, default_domain: str = "") -> Iterator[ExportEntry]:
    """Stream the entries of a CSV export, validating as it goes.

    Raises ExportError (naming the line) for an unreadable file, a header without ``login``
    and ``backend``, a row with an empty login or backend, a login name that
    ``normalize_login`` rejects, and a login name listed twice (after normalization with
    ``default_domain``).  Entries before a bad row have already been yielded: a caller that
    writes as it reads must discard its work on ExportError (the sync does).
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    with handle:
        lines = _TextLines(path, handle)
        reader = csv.reader(lines)
        try:
            columns = _read_header(path, reader)
            yield from _rows(path, reader, columns, default_domain)
        except csv.Error as exc:
            raise ExportError(path, reader.line_num, f"bad CSV: {exc}") from None
        except OSError as exc:
            raise ExportError(path, lines.number, f"cannot read: {exc.strerror}") from None


class _TextLines:
    """The file's lines decoded one by one, so that a decoding error names its own line
    (a text-mode file decodes 8 KiB at a time, far ahead of the CSV reader)."""

    def __init__(self, path: str, handle):
        self.path = path
        self.lines = iter(handle)
        self.number = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.number += 1
        try:
            if self.number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            return line.decode()
        except UnicodeDecodeError:
            raise ExportError(self.path, self.number, "not UTF-8 text") from None


def _read_header(path: str, reader) -> tuple[int, ...]:
    """Column indexes of login, backend, backend_login, mailbox_id (-1 = absent)."""
    for header in reader:
        if any(cell.strip() for cell in header):
            break
    else:
        raise ExportError(path, reader.line_num or 1, "empty file: no header line")
    names = [cell.strip().lower() for cell in header]
    indexes = []
    for column in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if names.count(column) > 1:
            raise ExportError(path, reader.line_num, f"header names column {column!r} twice")
        if column not in names and column in REQUIRED_COLUMNS:
            raise ExportError(path, reader.line_num,
                              f"header has no {column!r} column (need at least login,backend)")
        indexes.append(names.index(column) if column in names else -1)
    return tuple(indexes)


def _rows(path: str, reader, columns: tuple[int, ...], default_domain: str
          ) -> Iterator[ExportEntry]:
    login_at, backend_at, backend_login_at, mailbox_id_at = columns
    width = max(columns) + 1
    padding = [""] * width
    seen_hashes: set[int] = set()
    for row in reader:
        if len(row) < width:
            if not row or not any(cell.strip() for cell in row):
                continue  # blank line
            row = row + padding[len(row):]
        line = reader.line_num
        raw_login, backend = row[login_at], row[backend_at].strip()
        if not raw_login.strip():
            raise ExportError(path, line, "empty login")
        if not backend:
            raise ExportError(path, line, "empty backend")
        try:
            login = normalize_login(raw_login, default_domain)
        except ValueError as exc:
            raise ExportError(path, line, f"bad login {raw_login.strip()[:80]!r}: {exc}") \
                from None
        login_hash = hash(login)
        if login_hash in seen_hashes:
            first = _first_line_of(path, login, columns, default_domain, line)
            if first is not None:
                raise ExportError(path, line, f"duplicate login {login!r} (first on line {first})")
        seen_hashes.add(login_hash)
        yield ExportEntry(
            line, login, backend,
            row[backend_login_at].strip() if backend_login_at >= 0 else "",
            row[mailbox_id_at].strip() if mailbox_id_at >= 0 else "")


def _first_line_of(path: str, login: str, columns: tuple[int, ...], default_domain: str,
                   before_line: int) -> int | None:
    """The line of the first row before ``before_line`` whose login normalizes to ``login``
    (rows up to there were already validated)."""
    login_at = columns[0]
    with open(path, "rb") as handle:
        reader = csv.reader(_TextLines(path, handle))
        _read_header(path, reader)
        for row in reader:
            if reader.line_num >= before_line:
                return None
            if len(row) > login_at and row[login_at].strip() and \
                    normalize_login(row[login_at], default_domain) == login:
                return reader.line_num
    return None  # pragma: no cover - the file changed under us

