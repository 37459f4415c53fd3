"""Reading tars within bounds: every tar the project reads goes through `tar_members`.

A member's bytes are read only when its size is at most the cap; sparse members (whose expanded
size can be far larger than what the archive stores) are refused; extended headers are capped.
An archive that ends before its end-of-archive marker, inside a header or inside a member's data,
raises `TarProblem("truncated_tar")` once every member before the cut has been yielded, so a
caller keeps what came before it.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Callable, Iterator

# A pax or GNU long-name header is a member too; nothing legitimate needs more than this.
MAX_HEADER_BYTES = 1 << 20
# The cap on a member of the tars the project writes itself (images, codes, text features).
MAX_OWN_MEMBER_BYTES = 64 << 20


class TarProblem(Exception):
    """A tar that cannot be read further. The message starts with the reason: `truncated_tar`
    (it ends before its end marker) or `corrupt_tar` (a header is not a tar header). `member`
    names the member whose data the cut falls in (None when it falls in a header)."""

    def __init__(self, reason: str, detail: str, member: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.member = reason, detail, member


@dataclass
class Member:
    name: str
    size: int
    data: bytes | None  # None when refused or not wanted
    offset: int = -1  # where its data starts in the file
    refused: str | None = None  # `too_large` or `sparse_member`


class _BoundedInfo(tarfile.TarInfo):
    """Headers that say where the archive was cut instead of ending the listing silently."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            raise TarProblem("truncated_tar", f"a header at byte {tar.offset} is cut ({e})") from None
        except tarfile.InvalidHeaderError as e:
            raise TarProblem("corrupt_tar", f"the header at byte {tar.offset} is not a tar header ({e})") from None

    def _proc_pax(self, tar):
        self._check_header_size()
        return super()._proc_pax(tar)

    def _proc_gnulong(self, tar):
        self._check_header_size()
        return super()._proc_gnulong(tar)

    def _check_header_size(self):
        if self.size > MAX_HEADER_BYTES:
            raise TarProblem("corrupt_tar", f"an extended header of {self.size} bytes (at most {MAX_HEADER_BYTES})")


def tar_members(fileobj: IO[bytes], label: str, max_member_bytes: int,
                wanted: Callable[[str], bool] | None = None) -> Iterator[Member]:
    """The regular-file members of a tar, in order: their bytes (when `wanted(name)`, or always
    without `wanted`), or why they were refused. Other members (folders, links) are skipped.
    Seekable files are read by seeking past unwanted data; others are streamed. `label` (the
    file's URL) names the tar in errors."""
    mode = "r:" if _seekable(fileobj) else "r|"
    try:
        tar = tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_BoundedInfo)
    except TarProblem as e:
        raise TarProblem(e.reason, f"{label}: {e.detail}") from None
    except (tarfile.TarError, EOFError) as e:
        raise TarProblem("corrupt_tar", f"{label}: not a readable tar ({e})") from None
    with tar:
        name = None  # the last member whose header was read
        try:
            for info in tar:
                name = info.name
                if not info.isfile():
                    continue
                if info.issparse():
                    yield Member(info.name, info.size, None, refused="sparse_member", offset=info.offset_data)
                elif info.size > max_member_bytes:
                    yield Member(info.name, info.size, None, refused="too_large", offset=info.offset_data)
                elif wanted is None or wanted(info.name):
                    yield Member(info.name, info.size, tar.extractfile(info).read(), offset=info.offset_data)
                else:
                    yield Member(info.name, info.size, None, offset=info.offset_data)
        except TarProblem as e:  # in a header
            raise TarProblem(e.reason, f"{label}: after member {name}: {e.detail}") from None
        except (tarfile.TarError, EOFError) as e:  # in the data of the member last named
            raise TarProblem("truncated_tar", f"{label}: cut in member {name} ({e})", member=name) from None


def _seekable(fileobj) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def split_name(name: str) -> tuple[str, str]:
    """A member's (sample key, extension) as WebDataset groups them: the key is the path up to the
    first dot of the file name, the extension the rest, lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()
