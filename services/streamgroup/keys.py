"""Every Redis key this project touches is named here, so sharding or hash tags change one place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from streamgroup.settings import Settings

PRODUCER_RUN_INFIX = ":producer-run:"


@dataclass(frozen=True, slots=True)
class StreamKeys:
    stream: str
    group: str
    dead_letter: str
    # The value of the metrics' `shard` label: the shard's place among the shards a process reads.
    shard: str = "0"

    def producer_run(self, run: str) -> str:
        """A producer run's marker: the last batch number of that run the stream holds. In the
        stream's hash slot: the batch script touches both."""
        return f"{slot_prefix(self.stream)}{PRODUCER_RUN_INFIX}{run}"

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


# Sharded streams (STREAMGROUP_SHARDS).


def shard_keys(stream: str, group: str, shards: int, dead_letter_stream: str | None = None) -> list[StreamKeys]:
    """The keys of each shard of one logical stream.

    One shard: exactly the keys of today (`stream`, and `dead_letter_stream` or `<stream>:dead`).
    N shards: shard i is `{<stream>:<i>}`, its dead-letter stream `{<stream>:<i>}:dead` (or
    `{<stream>:<i>}:<dead_letter_stream>`): a hash tag of its own, so a cluster can put each shard
    on another node, and the dead-letter stream in its shard's slot, so dead-lettering stays one
    script. Braces in the names are dropped inside the tag (`{orders}` gives `{orders:0}`), since
    only the first `{...}` of a key is hashed."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if shards == 1:
        return [StreamKeys(stream, group, dead_letter_stream or f"{stream}:dead")]
    base = _untagged(stream)
    suffix = _untagged(dead_letter_stream) if dead_letter_stream else "dead"
    return [StreamKeys(f"{{{base}:{i}}}", group, f"{{{base}:{i}}}:{suffix}", str(i)) for i in range(shards)]


def written_shards(settings: Settings) -> list[StreamKeys]:
    """The shards the producer writes to: STREAMGROUP_SHARDS of them."""
    return shard_keys(settings.stream, settings.group, settings.shards, settings.dead_letter_stream)


def read_shards(settings: Settings) -> list[StreamKeys]:
    """The shards consumers and the reclaimer read: those written to, then, while the number of
    shards changes (STREAMGROUP_PREVIOUS_SHARDS), the old layout's shards that are not among them,
    so that what they still hold is handled. A shard's label is its place in this list: with no
    change under way, its index."""
    current = written_shards(settings)
    if not settings.previous_shards:
        return current
    names = {keys.stream for keys in current}
    previous = shard_keys(settings.stream, settings.group, settings.previous_shards, settings.dead_letter_stream)
    extra = [keys for keys in previous if keys.stream not in names]
    return current + [replace(keys, shard=str(len(current) + i)) for i, keys in enumerate(extra)]


def _untagged(name: str) -> str:
    return name.replace("{", "").replace("}", "")


def shard_of(value: bytes | str, shards: int) -> int:
    """The shard for a partition value: the same value always goes to the same shard, so its
    messages keep their order, in every process and Python version (no salted hash()).

    shard = jump_hash(first 8 bytes of BLAKE2b(value as UTF-8), big-endian, shards): Lamping and
    Veach's jump consistent hash, which, when N grows to N+1, moves only about 1/(N+1) of the
    values, and all of them to the new shard."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    data = value.encode() if isinstance(value, str) else value
    return jump_hash(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big"), shards)


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach 2014, arXiv:1406.2294) of a 64-bit key."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket
