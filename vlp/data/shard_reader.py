"""The valid samples of one shard, read outside the training loader.

The caption survey, the retrieval index's embedding pass and CapFilt each read whole shards
themselves (the index also needs each image's byte offset, which WebDataset's pipeline does
not give). One reader serves them, so all three agree with training on what a valid sample is
(`parse_sample`) and on how a damaged shard ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import webdataset as wds

from vlp.data.images import IMAGE_EXTENSIONS
from vlp.data.loader import parse_sample
from vlp.data.skips import SkipCounter
from vlp.data.tar import BrokenTar, member_extension, tar_samples


@dataclass
class ParsedSample:
    key: str
    members: dict[str, tuple[str, int, bytes]]  # extension → (member name, byte offset in the tar, contents)
    contents: dict[str, bytes]                  # extension → contents: what `parse_sample` read
    image_bytes: bytes
    captions: list[str]
    meta: dict

    def image_member(self) -> tuple[str, int, bytes]:
        """The member `parse_sample` took the image from."""
        return next(self.members[ext] for ext in IMAGE_EXTENSIONS if ext in self.members)


def parsed_samples(url: str, skips: SkipCounter) -> Iterator[ParsedSample]:
    """Valid samples of one shard (a path or any URL WebDataset opens) in member order. Bad
    members are counted skips; a shard that cannot be opened, or is cut short, records one
    `bad_tar` skip and yields what precedes the damage."""
    try:
        stream = wds.gopen(url)
    except (OSError, ValueError) as err:
        skips.record("bad_tar", f"{url}: {err}")
        return
    broken = False
    try:
        for key, entries in tar_samples(stream):
            members = {member_extension(name): (name, offset, data) for name, offset, data in entries}
            contents = {ext: data for ext, (_, _, data) in members.items()}
            parsed = parse_sample({"__key__": key, "__url__": url, **contents}, skips)
            if parsed is not None:
                yield ParsedSample(key, members, contents, *parsed)
    except (BrokenTar, OSError, EOFError) as err:
        # The sample the damage cut into is not yielded: it goes with the counted bad tar.
        broken = True
        skips.record("bad_tar", f"{url}: {err}")
    finally:
        try:
            stream.close()
        except OSError as err:  # a `pipe:` command's failure arrives with its exit status
            if not broken:
                skips.record("bad_tar", f"{url}: {err}")
