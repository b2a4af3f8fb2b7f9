"""A private Postfix for the submission tests: the MTA behind Dovecot's submission service.

It listens on one loopback port and delivers mail for ``example.com`` with its ``virtual``
agent straight into the Maildirs of the test Dovecot back-ends, so a message sent through the
gateway can be read back over IMAP.  Everything (config, queue, data, log) lives in one
temporary folder; ``stop()`` runs ``postfix stop`` and then kills whatever is left.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from servers import LOOPBACK, _Process, find_binary, free_port

MASTER_CF = """\
# Written by tests/mta.py: no chroot (the temporary queue has no chroot files).
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(_Process):
    """Postfix on a free loopback port delivering ``mailboxes`` (address → Maildir path).

    Runs as root only (Postfix's master must start as root to drop to ``mail_owner``);
    ``Postfix.usable()`` says whether this machine can run it.
    """

    name = "postfix"
    signal_group = True

    def __init__(self, tmpdir, mailboxes: dict[str, Path], uid: int, gid: int,
                 domains=("example.com",), port: int = 0):
        super().__init__(tmpdir)
        self.mailboxes = dict(mailboxes)
        self.uid, self.gid = uid, gid
        self.domains = tuple(domains)
        self.host = LOOPBACK
        self.port = port
        self.root: Path | None = None

    @staticmethod
    def usable() -> bool:
        return os.geteuid() == 0 and find_binary("postfix") is not None

    def _main_cf(self) -> str:
        root = self.root
        return f"""\
# Written by tests/mta.py for a private test MTA.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
myhostname = mta.mailgate.test
mydomain = mailgate.test
myorigin = $mydomain
mydestination =
inet_interfaces = {self.host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
smtpd_authorized_xclient_hosts = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
message_size_limit = 52428800
virtual_mailbox_limit = 0
virtual_mailbox_domains = {' '.join(self.domains)}
virtual_mailbox_base = /
virtual_mailbox_maps = texthash:{root}/mailboxes
virtual_uid_maps = static:{self.uid}
virtual_gid_maps = static:{self.gid}
virtual_minimum_uid = 1
smtputf8_enable = yes
"""

    def start(self) -> "Postfix":
        binary = find_binary("postfix")
        if binary is None:
            raise FileNotFoundError("postfix is not installed")
        self.root = Path(tempfile.mkdtemp(prefix="mailgate-postfix-", dir="/tmp"))
        self.root.chmod(0o755)
        for sub in ("queue", "data"):
            (self.root / sub).mkdir(mode=0o755)
        os.chown(self.root / "data", *_postfix_ids())
        self.port = self.port or free_port()   # may be chosen first: Dovecot relays to it
        lines = [f"{address} {str(path).lstrip('/').rstrip('/')}/"
                 for address, path in self.mailboxes.items()]
        (self.root / "mailboxes").write_text("\n".join(lines) + "\n")
        (self.root / "main.cf").write_text(self._main_cf())
        (self.root / "master.cf").write_text(MASTER_CF.format(host=self.host, port=self.port))
        self._spawn([binary, "-c", str(self.root), "start-fg"], self.root / "postfix.stderr")
        self._await_ports((self.port,), "postfix", self.log_text, timeout=30)
        return self

    def stop(self, sig=None, timeout: float = 10.0):
        """``postfix stop``, then the group is killed by _Process.stop; the folder goes."""
        if self.root is not None and self.running:
            subprocess.run([find_binary("postfix"), "-c", str(self.root), "stop"],
                           capture_output=True, timeout=30)
        try:
            return super().stop(sig or signal.SIGTERM, timeout)
        finally:
            if self.root is not None and self.root.exists():
                for name in ("maillog", "postfix.stderr"):
                    if (self.root / name).exists():
                        shutil.copy(self.root / name, self.tmpdir / f"postfix-{name}")
                shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        parts = []
        for name in ("postfix.stderr", "maillog"):
            for path in ((self.root / name) if self.root else None,
                         self.tmpdir / f"postfix-{name}"):
                if path is not None and path.exists():
                    parts.append(path.read_text(errors="replace"))
                    break
        return "".join(parts)


def _postfix_ids() -> tuple[int, int]:
    import pwd
    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid
