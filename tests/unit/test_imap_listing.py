"""Extended LIST (RFC 5258) as the gateway merges it: the command's options, and which
folders an answer holds with which attributes, from a made-up merged tree."""
from __future__ import annotations

import pytest

from gateway.imap import parser
from gateway.imap.listing import Entry, MergedList, format_entry, parse_list, pattern_regex


def args(text: str) -> list:
    return parser.parse_command([b"t " + text.encode() + b"\r\n"]).args


@pytest.mark.parametrize("text", ['LIST "" "*"', 'LIST "" %', 'LIST "a/" "b*"'])
def test_basic_forms_are_left_to_rlist(text):
    assert parse_list(args(text)) is None


@pytest.mark.parametrize("text, selection, patterns, returns, items", [
    ('LIST "" "%" RETURN (CHILDREN)', set(), ["%"], {"CHILDREN"}, []),
    ('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)',
     {"SUBSCRIBED", "RECURSIVEMATCH"}, ["%"], {"CHILDREN"}, []),
    ('LIST "" "*" RETURN (STATUS (MESSAGES unseen))', set(), ["*"], {"STATUS"},
     ["MESSAGES", "UNSEEN"]),
    ('LIST "" ("INBOX" "Public Folders.*")', set(), ["INBOX", "Public Folders.*"], set(), []),
    ('LIST (special-use) "" "*"', {"SPECIAL-USE"}, ["*"], set(), []),
])
def test_extended_forms(text, selection, patterns, returns, items):
    request = parse_list(args(text))
    assert (request.selection, request.patterns, request.returns, request.status_items) == (
        selection, patterns, returns, items)


@pytest.mark.parametrize("text", [
    'LIST (RECURSIVEMATCH) "" "%"', 'LIST (REMOTE RECURSIVEMATCH) "" "%"',
    'LIST (FOO) "" "%"', 'LIST "" "%" RETURN (FOO)', 'LIST "" "%" RETURN CHILDREN',
    'LIST "" "%" RETURN (STATUS)', 'LIST "" "%" RETURN (STATUS ("x y"))', 'LIST ()',
])
def test_malformed_forms_are_refused(text):
    with pytest.raises(ValueError):
        parse_list(args(text))


def test_patterns_follow_the_delimiter():
    assert pattern_regex("", "%", "/").fullmatch("INBOX")
    assert not pattern_regex("", "%", "/").fullmatch("public/news")
    assert pattern_regex("", "public/*", "/").fullmatch("public/a/b")
    assert pattern_regex("", "a.b%", "/").fullmatch("a.bc")


TREE = {name: Entry(name, attrs, "/") for name, attrs in [
    ("INBOX", ["\\HasNoChildren"]), ("public", ["\\Noselect", "\\HasChildren"]),
    ("public/news", []), ("public/old", ["\\HasChildren"]), ("Sent", ["\\Sent"])]}


def answer(text: str, subscribed=()) -> dict[str, tuple[set, bytes]]:
    request = parse_list(args(text))
    subs = {name: Entry(name, [], "/") for name in subscribed}
    return {entry.name: (set(entry.attributes), extra)
            for entry, extra in MergedList(None, None, None).select(request, TREE, subs)}


def test_children_are_worked_out_from_the_merged_tree():
    found = answer('LIST "" "*" RETURN (CHILDREN)')
    assert found["public"][0] == {"\\Noselect", "\\HasChildren"}
    assert "\\HasNoChildren" in found["public/news"][0]
    assert "\\HasNoChildren" in found["public/old"][0]   # the source said otherwise


def test_subscribed_recursivematch_gives_childinfo_and_nonexistent():
    found = answer('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"', ["public/news", "INBOX", "gone"])
    assert found["INBOX"] == ({"\\HasNoChildren", "\\Subscribed"}, b"")
    assert found["public"][1] == b' ("CHILDINFO" ("SUBSCRIBED"))'
    assert found["gone"][0] == {"\\NonExistent", "\\Subscribed"}
    assert "Sent" not in found


def test_special_use_selection_and_the_answer_line():
    assert set(answer('LIST (SPECIAL-USE) "" "*"')) == {"Sent"}
    line = format_entry("LIST", Entry('a "b"', ["\\HasNoChildren"], "/"))
    assert line == b'* LIST (\\HasNoChildren) "/" "a \\"b\\""\r\n'
