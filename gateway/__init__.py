"""mailgate: an IMAP/POP3 front-end gateway."""
__version__ = "0.1.0"
