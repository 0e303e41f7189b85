"""The sample mail generator: deterministic, realistic enough, and parseable."""

from __future__ import annotations

from collections import Counter

from crdtmail.model.flags import DRAFT, SEEN
from crdtmail.model.message import UNDATED, parse_message
from crdtmail.sample import generate_messages, odd_messages


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = [m.raw for m in generate_messages(50, seed=7)]
    assert first == [m.raw for m in generate_messages(50, seed=7)]
    assert first != [m.raw for m in generate_messages(50, seed=8)]


def test_distribution_looks_like_a_mailbox() -> None:
    messages = list(generate_messages(2000, seed=1))
    parsed = [parse_message(m.raw) for m in messages]
    folders = Counter(m.folder for m in messages)
    assert folders[()] > folders[("Archive",)] > folders[("Drafts",)] > 0
    assert all(DRAFT in m.flags for m in messages if m.folder == ("Drafts",))
    assert 0.4 < sum(SEEN in m.flags for m in messages) / len(messages) < 0.99
    sizes = sorted(m.envelope.size for m in parsed)
    assert 2_000 < sizes[len(sizes) // 2] < 8_000 and sizes[-1] > 100_000
    assert len({p.message_id for p in parsed}) == len(parsed)
    assert sum(p.shard == UNDATED for p in parsed) == 0  # undated ones still carry a Received date
    assert sum(not p.envelope.message_id_header for p in parsed) >= 5
    assert len({p.shard for p in parsed}) >= 12
    assert any(not p.envelope.sender.isascii() for p in parsed)
    assert sum(p.envelope.subject.startswith("Re: ") for p in parsed) > 100


def test_odd_messages_parse() -> None:
    names = [name for name, raw in odd_messages() if parse_message(raw)]
    assert len(names) == len(odd_messages())
