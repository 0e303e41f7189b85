"""crdtmail: one virtual mailbox across a desktop Maildir and a phone, kept in step by CRDTs, offline-first."""

__version__ = "0.1.0"
