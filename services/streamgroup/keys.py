"""Every Redis key this project touches is named here, so sharding or hash tags change one place."""

from __future__ import annotations

from dataclasses import dataclass

from streamgroup.settings import Settings


@dataclass(frozen=True, slots=True)
class StreamKeys:
    stream: str
    group: str
    dead_letter: str

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamKeys:
        return cls(stream=settings.stream, group=settings.group, dead_letter=settings.dead_letter_key)

    def consumer_name_lease(self, consumer: str) -> str:
        """The key that says which process uses a consumer name right now. It hashes to the stream's
        slot (Redis Cluster): it starts with the stream's hash tag, or with the whole stream name as one."""
        return f"{slot_prefix(self.stream)}:{self.group}:consumer:{consumer}"


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes instead of the whole key: the text between the first `{` and the
    first `}` after it, if not empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def slot_prefix(key: str) -> str:
    """A prefix for derived keys that puts them in `key`'s hash slot."""
    if hash_tag(key) is not None or "}" in key:
        # Its own tag decides; a name with a `}` but no tag cannot be wrapped in one (the tag
        # would end at that `}`), so derived keys may then hash elsewhere: only matters in Cluster.
        return key
    return "{" + key + "}"
