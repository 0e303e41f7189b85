"""Bridges between a replica and a mail store other programs use: the desktop's Maildir (``maildir``)."""
