"""Read shard samples together with the byte offset of their image inside the tar.

The index serves images straight from the shards (seek + read by offset), so the embedding
pass reads tars with the data room's `tar_samples`, which also gives each member's offset
(and, unlike `tarfile`, notices a tar cut between two members).
Decoding is left to the caller, so skipping a finished chunk on resume costs no decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from vlp.data.images import IMAGE_EXTENSIONS
from vlp.data.loader import parse_sample
from vlp.data.skips import SkipCounter
from vlp.data.tar import BrokenTar, member_extension, tar_samples

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
    try:
        with open(path, "rb") as stream:
            for key, members in tar_samples(stream):
                sample = _assemble(path, key, members, skips)
                if sample is not None:
                    yield sample
    except (BrokenTar, OSError) as err:
        # The sample the damage cut into is not yielded: it goes with the counted bad tar.
        skips.record("bad_tar", f"{path}: {err}")


def read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def _assemble(path: str, key: str, members: list[tuple[str, int, bytes]],
              skips: SkipCounter) -> Optional[RawSample]:
    by_ext = {member_extension(name): (name, offset, data) for name, offset, data in members}
    # The data room's parser decides what a valid sample is, so the index and training agree.
    raw = {"__key__": key, "__url__": path}
    raw.update({ext: data for ext, (_, _, data) in by_ext.items()})
    parsed = parse_sample(raw, skips)
    if parsed is None:
        return None
    image_bytes, captions, meta = parsed
    name, offset, data = next(by_ext[e] for e in IMAGE_EXTENSIONS if e in by_ext)
    return RawSample(key=key, shard=path, image_member=name, image_offset=offset,
                     image_size=len(data), captions=captions, json=meta, image_bytes=image_bytes)
