"""A small streaming tar reader for shards.

Python's tarfile parses every header field in Python and silently stops at a file cut
between two members. This reader only takes what shards need (name, size, type; ustar
prefixes, GNU long names and pax paths), checks each header's checksum, and raises
`BrokenTar` for any archive that ends before its end-of-archive block.
"""
from __future__ import annotations

import re
import zlib
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's convention for non-sample members


class BrokenTar(Exception):
    """A truncated or corrupt tar; the message says where."""


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(file name, contents) of each regular file, in archive order."""
    for name, _, data in tar_entries(stream):
        yield name, data


def tar_samples(stream: BinaryIO) -> Iterator[tuple[str, list[tuple[str, int, bytes]]]]:
    """(key, its members as `tar_entries` gives them) per sample: members sharing a key (the
    name up to the first dot of its last path part, img2dataset's `key.jpg`, `key.txt`) are
    adjacent in a shard. A `BrokenTar` propagates without the sample it cut into, so a caller
    that counts the broken tar never sees a sample with members missing."""
    key, group = None, []
    for entry in tar_entries(stream):
        member_key = sample_key(entry[0])
        if group and member_key != key:
            yield key, group
            group = []
        key = member_key
        group.append(entry)
    if group:
        yield key, group


def sample_key(name: str) -> str:
    directory, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{directory}/{stem}" if directory else stem


def member_extension(name: str) -> str:
    base = name.rpartition("/")[2]
    return base.split(".", 1)[1].lower() if "." in base else ""


def tar_entries(stream: BinaryIO) -> Iterator[tuple[str, int, bytes]]:
    """(file name, byte offset of the contents in the archive, contents) of each regular
    file; the offset lets a reader fetch one member later with a seek (the index serves
    images straight from the shards)."""
    long_name, offset = None, 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            where = "ends" if not header else "is cut inside a header"
            raise BrokenTar(f"{where} at byte {offset} without the end-of-archive block (truncated?)")
        if header == _ZERO_BLOCK:
            return
        _check_sum(header, offset)
        size, kind = _size(header), header[156:157]
        padded = stream.read(size + -size % BLOCK)  # one read for contents and padding
        name = long_name or _name(header)
        if len(padded) < size:
            raise BrokenTar(f"is cut inside member {name!r} (truncated?)")
        data = padded[:size]
        offset += BLOCK + len(padded)
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header: only the path matters here
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            long_name = None
            if not _META.match(name):
                yield name, offset - len(padded), data
        else:  # directories, links, global pax headers: not samples
            long_name = None if kind != b"g" else long_name


def _check_sum(header: bytes, offset: int) -> None:
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
    except ValueError:
        stored = -1
    # The checksum is the byte sum with its own 8-byte field counted as spaces.
    if stored != _byte_sum(header) - sum(header[148:156]) + 8 * 32:
        raise BrokenTar(f"has a corrupt header at byte {offset} (checksum mismatch)")


def _byte_sum(block: bytes) -> int:
    # sum() walks the block as Python ints (2 us a header, most of the reader's time). The
    # low 16 bits of Adler-32 are 1 + the byte sum mod 65521: exact when every byte is below
    # 128 (a sum of at most 512 * 127 < 65521), which ASCII headers are.
    if block.isascii():
        return (zlib.adler32(block) & 0xFFFF) - 1
    return sum(block)


def _size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    # Records are "<length> <key>=<value>\n".
    for record in data.split(b"\n"):
        _, _, item = record.partition(b" ")
        key, _, value = item.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
    return None
