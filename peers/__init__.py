"""Peer processes built on crdtmail: the desktop peer and the simulated mobile peer (later issues)."""
