"""Causal readiness of Yjs updates: what an update needs before it can be applied without pending state.

Yrs (pycrdt 0.14.13) loses map entries when several updates wait as "pending" for missing dependencies and
then integrate together: deliver a client's updates 0, 2, 3, 1, where 3 overwrites a key set by 1, and the key
is gone on the receiver (tests/model/test_causal.py shows it). So crdtmail never hands Yrs an update whose
dependencies are missing: ``missing_dependencies`` reads the update's header, every item's origin references and
its delete set (lib0 v1 update encoding), and the Mailbox holds an update back until the state vector covers
what it needs.

The decoder is bounds-checked: malformed bytes raise ``UpdateDecodeError`` instead of reading past the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crdtmail.errors import ModelError

_MAX_VARUINT_BYTES = 8
_MAX_NESTING = 64
_SKIP = 10  # the struct kind of a skipped range


class UpdateDecodeError(ModelError):
    """The bytes are not a well-formed Yjs v1 update."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise UpdateDecodeError("update truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varuint(self) -> int:
        # Inlined rather than through byte(): every update a peer receives is read here before it is applied.
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80:  # most of them: counts, clocks, lengths
            self.pos = pos + 1
            return data[pos]
        end = min(len(data), pos + _MAX_VARUINT_BYTES)
        result = 0
        shift = 0
        while pos < end:
            value = data[pos]
            pos += 1
            result |= (value & 0x7F) << shift
            if value < 0x80:
                self.pos = pos
                return result
            shift += 7
        if pos - self.pos < _MAX_VARUINT_BYTES:  # the bytes ran out before the integer ended
            raise UpdateDecodeError("update truncated")
        raise UpdateDecodeError("variable-length integer too long")

    def skip_varint(self) -> None:
        for _ in range(_MAX_VARUINT_BYTES + 2):
            if self.byte() < 0x80:
                return
        raise UpdateDecodeError("variable-length integer too long")

    def skip(self, count: int) -> None:
        if count < 0 or self.pos + count > len(self.data):
            raise UpdateDecodeError("update truncated")
        self.pos += count

    def bytes(self, count: int) -> bytes:
        start = self.pos
        self.skip(count)
        return self.data[start : self.pos]

    def varstring(self) -> str:
        try:
            return self.bytes(self.varuint()).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise UpdateDecodeError(f"a string in the update is not UTF-8: {exc.reason}") from None

    def skip_varstring(self) -> None:
        self.skip(self.varuint())

    def skip_any(self, depth: int = 0) -> None:
        if depth > _MAX_NESTING:
            raise UpdateDecodeError("value nested too deeply")
        tag = self.byte()
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            return
        if tag == 125:
            self.skip_varint()
        elif tag == 124:
            self.skip(4)
        elif tag in (123, 122):
            self.skip(8)
        elif tag in (119, 116):  # string, bytes
            self.skip(self.varuint())
        elif tag == 118:  # object
            for _ in range(self.varuint()):
                self.skip_varstring()
                self.skip_any(depth + 1)
        elif tag == 117:  # array
            for _ in range(self.varuint()):
                self.skip_any(depth + 1)
        else:
            raise UpdateDecodeError(f"unknown value tag {tag}")


@dataclass
class UpdateShape:
    """What an update contains and refers to, per client id."""

    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # client -> (first clock, end clock)
    needs: dict[int, int] = field(default_factory=dict)  # client -> clocks below this must be known
    deletes: dict[int, int] = field(default_factory=dict)  # client -> end of the highest deleted range
    skipped: dict[int, int] = field(default_factory=dict)  # client -> end of the highest range it does not carry


def _need(needs: dict[int, int], client: int, end: int) -> None:
    if end > needs.get(client, 0):
        needs[client] = end


def decode_shape(update: bytes) -> UpdateShape:
    """Read an update's struct ranges, the ids its items refer to, and its delete set."""
    reader = _Reader(update)
    shape = UpdateShape()
    for _ in range(reader.varuint()):
        structs = reader.varuint()
        client = reader.varuint()
        clock = reader.varuint()
        start = clock
        for _ in range(structs):
            if reader.pos < len(reader.data) and reader.data[reader.pos] & 0x1F == _SKIP:
                # A range this update does not carry (a merge of updates with a gap): what follows it integrates
                # only where the document already has the range.
                reader.pos += 1
                clock += reader.varuint()
                _need(shape.skipped, client, clock)
                continue
            clock += _skip_struct(reader, shape)
        if structs:
            shape.ranges[client] = (start, clock)
    for _ in range(reader.varuint()):
        client = reader.varuint()
        for _ in range(reader.varuint()):
            clock = reader.varuint()
            length = reader.varuint()
            _need(shape.deletes, client, clock + length)
    return shape


def _skip_struct(reader: _Reader, shape: UpdateShape) -> int:
    """Skip one struct, recording the ids it refers to; returns its length in clock units."""
    info = reader.byte()
    kind = info & 0x1F
    if kind == 0:  # GC
        return reader.varuint()
    needs = shape.needs
    has_origin = bool(info & 0x80)
    has_right = bool(info & 0x40)
    if has_origin:
        client, clock = reader.varuint(), reader.varuint()
        _need(needs, client, clock + 1)
    if has_right:
        client, clock = reader.varuint(), reader.varuint()
        _need(needs, client, clock + 1)
    if not has_origin and not has_right:
        if reader.varuint() == 1:  # parent is a root type, named
            reader.skip_varstring()
        else:
            client, clock = reader.varuint(), reader.varuint()
            _need(needs, client, clock + 1)
        if info & 0x20:
            reader.skip_varstring()  # key in a map
    if kind == 1:  # deleted
        return reader.varuint()
    if kind == 2:  # JSON
        count = reader.varuint()
        for _ in range(count):
            reader.skip_varstring()
        return count
    if kind == 3:  # binary
        reader.skip(reader.varuint())
        return 1
    if kind == 4:  # string: its clock length is counted in UTF-16 code units
        text = reader.varstring()
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    if kind == 5:  # embed
        reader.skip_varstring()
        return 1
    if kind == 6:  # format
        reader.skip_varstring()
        reader.skip_varstring()
        return 1
    if kind == 7:  # type
        type_ref = reader.varuint()
        if type_ref in (3, 5):  # XmlElement, XmlHook carry a name
            reader.skip_varstring()
        return 1
    if kind == 8:  # any
        count = reader.varuint()
        for _ in range(count):
            reader.skip_any()
        return count
    if kind == 9:  # sub-document
        reader.skip_varstring()
        reader.skip_any()
        return 1
    raise UpdateDecodeError(f"unknown struct kind {kind}")


def decode_state_vector(state_vector: bytes) -> dict[int, int]:
    """A Yjs state vector as {client: clock}."""
    reader = _Reader(state_vector)
    result: dict[int, int] = {}
    for _ in range(reader.varuint()):
        client = reader.varuint()
        result[client] = reader.varuint()
    return result


def missing_dependencies(update: bytes, state: dict[int, int]) -> bool:
    """Whether applying ``update`` on a document with ``state`` would leave some of it pending in Yrs."""
    return check_update(update, state)[0]


def check_update(update: bytes, state: dict[int, int]) -> tuple[bool, dict[int, int] | None]:
    """Whether applying ``update`` on a document with ``state`` would leave some of it pending in Yrs
    (``missing_dependencies``), and if not, the document's state vector after it.

    A peer receiving a change reads the state after it here instead of encoding the document's and decoding it.
    """
    shape = decode_shape(update)
    available = dict(state)
    for client, (start, end) in shape.ranges.items():
        if start > state.get(client, 0):
            return True, None  # a gap before this client's structs
        if end > available.get(client, 0):
            available[client] = end
    for client, end in shape.skipped.items():
        if end > state.get(client, 0):
            return True, None  # a range it does not carry, before some it does
    for needs in (shape.needs, shape.deletes):
        for client, end in needs.items():
            if end > available.get(client, 0):
                return True, None
    return False, available
