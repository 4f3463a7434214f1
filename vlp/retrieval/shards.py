"""Read shard samples together with the byte offset of their image inside the tar.

The index serves images straight from the shards (seek + read by offset), so the embedding
pass reads tars with the data room's shard reader, which also gives each member's offset
(and, unlike `tarfile`, notices a tar cut between two members).
Decoding is left to the caller, so skipping a finished chunk on resume costs no decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from vlp.data.shard_reader import parsed_samples
from vlp.data.skips import SkipCounter

IMAGE_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class RawSample:
    key: str
    shard: str
    image_member: str
    image_offset: int
    image_size: int
    captions: list[str]
    json: dict = field(default_factory=dict)
    image_bytes: Optional[bytes] = None


def iter_shard(path: str, skips: SkipCounter) -> Iterator[RawSample]:
    """Samples of one tar in member order; bad members are counted skips, a truncated tar
    yields what precedes the damage and records one `bad_tar` skip."""
    for sample in parsed_samples(path, skips):
        name, offset, data = sample.image_member()
        yield RawSample(key=sample.key, shard=path, image_member=name, image_offset=offset,
                        image_size=len(data), captions=sample.captions, json=sample.meta,
                        image_bytes=sample.image_bytes)


def read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data

