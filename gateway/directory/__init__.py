"""The directory: where each mailbox lives (Redis cache, msgpack records) and the syncs that
fill it.  See records.py for the key layout."""
from .records import MailboxRecord, normalize_login

__all__ = ["MailboxRecord", "normalize_login"]
