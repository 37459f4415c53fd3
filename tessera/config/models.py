"""`model_sources`: where `tessera fetch-models` gets a model a config names, keyed by that name."""
from __future__ import annotations

from pydantic import model_validator

from tessera.config.base import Section


class ModelSource(Section):
    # One of: a URL (with the sha256 the download must have; `member` takes one file out of a
    # .zip), a Hugging Face repo (`file`: one file of it, else the whole snapshot), or an
    # open_clip pretrained tag "ARCH/TAG" (e.g. ViT-L-14/openai). An entry with only `sha256`
    # pins the built-in source of that name (one that has no published checksum).
    url: str | None = None
    sha256: str | None = None  # the sha256 a url download must have (64 hex digits)
    member: str | None = None  # one file taken out of a .zip fetched by url
    hub: str | None = None  # a Hugging Face repo id
    file: str | None = None  # one file of the hub repo; unset: the whole snapshot
    revision: str | None = None  # the hub repo's branch, tag or commit
    open_clip: str | None = None  # an open_clip pretrained tag ARCH/TAG
    # A URL or a hub repo is fetched over https only, from a public address, checked at every
    # connection and redirect. A mirror on plain http, or on a private network (loopback,
    # RFC 1918), is allowed here by name, one model at a time. Metadata addresses are refused
    # whatever is set.
    allow_http: bool = False
    allow_private: bool = False

    @model_validator(mode="after")
    def _one_origin(self):
        given = [k for k in ("url", "hub", "open_clip") if getattr(self, k)]
        if len(given) != 1 and not self.pins_only:
            raise ValueError(f"give exactly one of url, hub, open_clip, or only a sha256 to pin a built-in "
                             f"source (got {', '.join(given) or 'none'})")
        if (self.allow_http or self.allow_private) and not (self.url or self.hub):
            raise ValueError("allow_http and allow_private are for a model fetched by url or from a hub")
        if self.member and not self.url:
            raise ValueError("member is for a .zip fetched by url")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())):
            raise ValueError("sha256 must be 64 hex digits")
        if self.open_clip and "/" not in self.open_clip:
            raise ValueError("open_clip must look like ARCH/TAG, e.g. ViT-L-14/openai")
        return self

    @property
    def pins_only(self) -> bool:
        """Only a sha256: the pin for the built-in source of the same name."""
        return bool(self.sha256) and not any(getattr(self, k) for k in
                                             ("url", "member", "hub", "file", "revision", "open_clip"))
