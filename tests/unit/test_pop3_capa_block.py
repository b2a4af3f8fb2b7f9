"""gateway/pop3/backend.BackendConnection.read_block: a multi-line answer taken in one go
gives exactly the lines read_lines gives (read_line one by one), or None and nothing taken."""
from types import SimpleNamespace

import pytest
from gevent import socket

from gateway.pop3.backend import MAX_LINE, BackendConnection

TARGET = SimpleNamespace(config=SimpleNamespace(name="T"))


def _connection(data: bytes) -> BackendConnection:
    near, far = socket.socketpair()
    far.sendall(data)
    far.close()
    return BackendConnection(near, TARGET)


BLOCKS = [
    b".\r\n",
    b"TOP\r\nUIDL\r\nSASL PLAIN LOGIN\r\n.\r\n",
    b"\r\nEMPTY ABOVE\r\n.\r\n",
    b"A\r\n" * 98 + b".\r\n",                    # 98 lines and the dot: 99 reads of 100
    b"A\r\n" * 99 + b".\r\n",                    # 99 lines and the dot: the 100th read
    b"A\r\n" * 100 + b".\r\n",                   # the dot is past the bound
    b"BARE LF\nTOP\r\n.\r\n",                    # not plain: line by line
    b"CR CR\r\r\nTOP\r\n.\r\n",
    b"X" * (MAX_LINE - 2) + b"\r\n.\r\n",        # the longest line allowed
    b"TOP\r\nUIDL\r\n",                          # no end yet
]


@pytest.mark.parametrize("block", BLOCKS, ids=range(len(BLOCKS)))
def test_a_block_reads_as_its_lines_do(block):
    after = b"+OK XCLIENT done\r\n"
    fast = _connection(b"+OK list\r\n" + block + after)
    slow = _connection(b"+OK list\r\n" + block + after)
    assert fast.read_line() == slow.read_line() == b"+OK list"
    if not block.endswith(b".\r\n"):          # not all there: nothing taken
        position = fast.reader.raw_pos
        assert fast.read_block(100) is None and fast.reader.raw_pos == position
        return
    taken = fast.read_block(100)
    if taken is None:                  # nothing taken: the line-by-line path reads it all
        taken = fast.read_lines(100)
    assert taken == slow.read_lines(100)
    if block.count(b"\n") <= 100:
        assert fast.read_line() == slow.read_line() == b"+OK XCLIENT done"
