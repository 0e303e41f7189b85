"""lib0-compatible binary encoding with a bounds-checked reader, and Yjs state-vector helpers.

The wire format of every crdtmail frame is built from three lib0 primitives (the encoding Yjs and y-protocols
use), so a Yjs implementation's own encoder produces the same bytes:

- varuint: an unsigned integer, 7 bits per byte, least significant group first, high bit set on every byte
  but the last. crdtmail accepts at most 8 bytes and values up to ``2**53 - 1`` (JavaScript's safe integers,
  which is all lib0 can represent), and only the shortest encoding, so every value has exactly one encoding.
- varbytes: a varuint byte count, then the bytes (lib0's ``writeVarUint8Array``).
- varstring: a varuint count of UTF-8 **bytes**, then the UTF-8 bytes (lib0's ``writeVarString``). pycrdt's
  ``Encoder.write_var_string`` counts characters instead, which breaks on any non-ASCII name.

``Reader`` checks every read against what is left of the buffer, checks every length against an explicit
maximum before slicing, and ``Reader.finish`` rejects trailing bytes where a frame must end. Every problem
raises ``FrameError`` (``FrameTooLargeError`` for a length over its limit) with a message saying what was
being read.
"""

from __future__ import annotations

from collections.abc import Mapping

from crdtmail.errors import FrameError, FrameTooLargeError

__all__ = [
    "EMPTY_STATE_VECTOR",
    "MAX_SAFE_INTEGER",
    "MAX_VARUINT_BYTES",
    "Reader",
    "Writer",
    "decode_state_vector",
    "dominates",
    "encode_state_vector",
    "encode_varbytes",
    "encode_varstring",
    "encode_varuint",
]

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest varuint accepted or written: lib0 decodes into a JavaScript number."""

MAX_VARUINT_BYTES = 8
"""8 groups of 7 bits hold 56 bits, enough for ``MAX_SAFE_INTEGER`` and no more bytes are ever needed."""

EMPTY_STATE_VECTOR = b"\x00"
"""The state vector of a document that holds nothing (zero clients)."""


def encode_varuint(value: int) -> bytes:
    """The lib0 varuint encoding of ``value`` (0 <= value <= 2**53 - 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError(f"a varuint must be an int, not {type(value).__name__}")
    if value < 0 or value > MAX_SAFE_INTEGER:
        raise FrameError(f"varuint {value} is outside 0..2**53-1")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_varbytes(data: bytes) -> bytes:
    """A varuint length followed by ``data``."""
    return encode_varuint(len(data)) + bytes(data)


def encode_varstring(text: str) -> bytes:
    """A varuint count of UTF-8 bytes followed by the UTF-8 bytes of ``text``."""
    return encode_varbytes(_utf8(text))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate has no UTF-8 form; lib0 would silently replace it, changing the name on the wire.
        raise FrameError(f"string {text!r} cannot be encoded as UTF-8: {exc.reason}") from None


class Writer:
    """Accumulates lib0-encoded values; ``to_bytes`` joins them."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def varuint(self, value: int) -> Writer:
        """Append a varuint."""
        self._parts.append(encode_varuint(value))
        return self

    def varbytes(self, data: bytes) -> Writer:
        """Append a length-prefixed byte string."""
        self._parts.append(encode_varuint(len(data)))
        self._parts.append(bytes(data))
        return self

    def varstring(self, text: str) -> Writer:
        """Append a UTF-8 string prefixed with its byte length."""
        return self.varbytes(_utf8(text))

    def raw(self, data: bytes) -> Writer:
        """Append bytes with no length prefix (a fixed-size field)."""
        self._parts.append(bytes(data))
        return self

    def to_bytes(self) -> bytes:
        """Everything written so far."""
        return b"".join(self._parts)


class Reader:
    """A bounds-checked reader over one buffer; every method raises ``FrameError`` instead of reading past it."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        # A bytearray (what websockets reads a frame into) is read through a view rather than copied whole: each
        # field is copied out once, and a frame holding a shard is megabytes.
        self._data: bytes | memoryview = data if isinstance(data, bytes) else memoryview(data).cast("B")
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self._pos

    @property
    def position(self) -> int:
        """Bytes read so far."""
        return self._pos

    def at_end(self) -> bool:
        """Whether every byte was read."""
        return self._pos >= len(self._data)

    def byte(self, what: str = "byte") -> int:
        """One byte."""
        if self._pos >= len(self._data):
            raise FrameError(f"truncated: no bytes left to read the {what}")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def varuint(self, what: str = "varuint", *, maximum: int = MAX_SAFE_INTEGER) -> int:
        """A varuint no larger than ``maximum`` (and never above 2**53 - 1)."""
        result = 0
        shift = 0
        for count in range(1, MAX_VARUINT_BYTES + 1):
            if self._pos >= len(self._data):
                raise FrameError(f"truncated inside the {what} (a varuint)")
            value = self._data[self._pos]
            self._pos += 1
            result |= (value & 0x7F) << shift
            if value < 0x80:
                if value == 0 and count > 1:
                    raise FrameError(f"the {what} is not minimally encoded (a varuint with a trailing zero group)")
                if result > MAX_SAFE_INTEGER:
                    raise FrameError(f"the {what} ({result}) is above 2**53-1")
                if result > maximum:
                    raise FrameTooLargeError(f"the {what} is {result}, over the limit of {maximum}")
                return result
            shift += 7
        raise FrameError(f"the {what} is a varuint longer than {MAX_VARUINT_BYTES} bytes")

    def raw(self, size: int, what: str = "field") -> bytes:
        """Exactly ``size`` bytes."""
        if size < 0 or size > self.remaining:
            raise FrameError(f"truncated: the {what} needs {size} bytes, {self.remaining} left")
        start = self._pos
        self._pos += size
        return bytes(self._data[start : self._pos])

    def varbytes(self, what: str = "bytes", *, maximum: int) -> bytes:
        """A length-prefixed byte string of at most ``maximum`` bytes."""
        size = self.varuint(f"length of the {what}", maximum=maximum)
        return self.raw(size, what)

    def varstring(self, what: str = "string", *, maximum: int) -> str:
        """A length-prefixed UTF-8 string of at most ``maximum`` bytes."""
        data = self.varbytes(what, maximum=maximum)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"the {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def count(self, what: str, *, maximum: int, min_item_bytes: int = 1) -> int:
        """An item count, checked against ``maximum`` and against what the rest of the buffer can hold.

        The second check rejects a huge count in a tiny frame before any loop runs over it.
        """
        value = self.varuint(f"number of {what}", maximum=maximum)
        if value * min_item_bytes > self.remaining:
            raise FrameError(f"truncated: {value} {what} announced but only {self.remaining} bytes left")
        return value

    def rest(self) -> bytes:
        """Every byte not read yet."""
        return self.raw(self.remaining, "rest")

    def finish(self, what: str = "frame") -> None:
        """Check that the buffer was read to its end."""
        if self._pos != len(self._data):
            raise FrameError(f"{self.remaining} unexpected bytes after the end of the {what}")


def decode_state_vector(data: bytes, *, max_clients: int = 1_000_000) -> dict[int, int]:
    """A Yjs state vector (a varuint count, then that many client and clock varuints) as ``{client: clock}``.

    The whole buffer must be the state vector; a client listed twice is an error (Yjs never writes one).
    """
    reader = Reader(data)
    result: dict[int, int] = {}
    for _ in range(reader.count("state vector clients", maximum=max_clients, min_item_bytes=2)):
        client = reader.varuint("state vector client id")
        clock = reader.varuint("state vector clock")
        if client in result:
            raise FrameError(f"state vector lists client {client} twice")
        result[client] = clock
    reader.finish("state vector")
    return result


def encode_state_vector(clocks: Mapping[int, int]) -> bytes:
    """The Yjs encoding of ``{client: clock}``, clients in descending order as Yjs writes them."""
    writer = Writer().varuint(len(clocks))
    for client in sorted(clocks, reverse=True):
        writer.varuint(client).varuint(clocks[client])
    return writer.to_bytes()


def dominates(a: Mapping[int, int], b: Mapping[int, int]) -> bool:
    """Whether state ``a`` has everything ``b`` has: every client's clock in ``a`` is at least its clock in ``b``.

    Equal state vectors dominate each other. A state vector says nothing about deletions (a Yjs delete does not
    advance a clock), so two documents that dominate each other can still differ in deletions.
    """
    return all(a.get(client, 0) >= clock for client, clock in b.items())

