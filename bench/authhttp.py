"""The auth_http service nginx's mail proxy asks at every login: always "go to Dovecot".

nginx sends one HTTP/1.0 request per login (Auth-User, Auth-Pass, ... headers) and reads
the answer headers.  This server does what the gateway's Redis lookup does for mailgate:
name the back-end.  Dovecot checks the password.  asyncio with a bare Protocol keeps its own
cost per login small; the bench reports its CPU separately from nginx's.

Run: ``python -m bench.authhttp PORT BACKEND_HOST IMAP_PORT POP3_PORT``.
"""
from __future__ import annotations

import asyncio
import signal
import sys

MAX_REQUEST = 16384


class AuthProtocol(asyncio.Protocol):
    def __init__(self, answers: dict[bytes, bytes]):
        self.answers = answers
        self.request = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.request += data
        if b"\r\n\r\n" in self.request:
            pop3 = b"\nauth-protocol: pop3" in self.request.lower()
            self.transport.write(self.answers[b"pop3" if pop3 else b"imap"])
            self.transport.close()
        elif len(self.request) > MAX_REQUEST:
            self.transport.close()


def answer_for(backend_host: str, backend_port: int) -> bytes:
    return (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: %s\r\nAuth-Port: %d\r\n\r\n"
            % (backend_host.encode(), backend_port))


async def serve(port: int, backend_host: str, imap_port: int, pop3_port: int) -> None:
    loop = asyncio.get_running_loop()
    answers = {b"imap": answer_for(backend_host, imap_port),
               b"pop3": answer_for(backend_host, pop3_port)}
    server = await loop.create_server(lambda: AuthProtocol(answers), "127.0.0.1", port,
                                      backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m bench.authhttp PORT BACKEND_HOST IMAP_PORT POP3_PORT",
              file=sys.stderr)
        return 2
    asyncio.run(serve(int(argv[0]), argv[1], int(argv[2]), int(argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
