"""The least-privilege ACL rule of each service: the one place docs/security.md and the tests read.

A rule is the list of ACL SETUSER arguments after `reset on >PASSWORD`: the commands the service
sends and the keys it touches, nothing else. `%W~key` grants writes only, `~key` reads and writes,
`%R~key` reads only. Commands run inside the Lua scripts (streamgroup.scripts) are checked against
the same rule by the server, so they are listed too.

    from streamgroup import acl
    acl.render("consumer")                        # the rule for the default stream, as one line
    acl.setuser_args("consumer", "sg-consumer", password, stream="orders")
    acl.render("consumer", shards=3)              # every shard's keys (STREAMGROUP_SHARDS=3)
    acl.render("consumer", stream="{orders}", cluster=True)  # on a Redis Cluster (every node)
"""

from __future__ import annotations

from collections.abc import Mapping

from streamgroup.keys import PRODUCER_RUN_INFIX, shard_keys, slot_prefix

SERVICES = ("producer", "consumer", "reclaimer", "status", "dead-letters")

# Every connection: PING (redis-py's health check on idle connections) and INFO (the server-version
# gate at connect). AUTH and HELLO need no grant.
CONNECTION: tuple[str, ...] = ("+ping", "+info")

# redis-py sends CLIENT SETINFO LIB-NAME/LIB-VER on every connect and ignores a refusal, so it is not
# required; granting it keeps the ACL log free of a denial per connection. Redis 7.0 does not know
# the subcommand and rejects the grant, so it is left out there (see server_knows_client_setinfo).
CLIENT_SETINFO = "+client|setinfo"

# On a Redis Cluster, redis-py's cluster client also sends, at start and after a failover or a
# resharding: CLUSTER SLOTS (who serves which slot), COMMAND (where each command's keys are) and
# ASKING (before a command on a slot mid-migration; the consumer's hand-sent reads too). INFO (in
# CONNECTION) is also what auto mode asks to tell a cluster node from a plain server. On every node.
CLUSTER: tuple[str, ...] = ("+cluster|slots", "+command", "+asking")

# What each service sends, and why.
COMMANDS: Mapping[str, tuple[str, ...]] = {
    "producer": (
        "+xadd",  # inside the batch script (streamgroup.scripts.ADD_BATCH)
        "+get",  # ... which reads and sets the run's marker (<stream>:producer-run:<run>) so a
        "+set",  # batch sent again after a late reply is not added twice
        "+evalsha",  # one script call per 1,000 messages ...
        "+script|load",  # ... loaded once per server when EVALSHA answers NOSCRIPT
    ),
    "consumer": (
        "+xgroup|create",  # group created at 0 with MKSTREAM on start
        "+xreadgroup",  # own pending history, then new entries
        "+xack",  # successes, in the same round trip as the next read
        "+xpending",  # delivery counts of history entries; inside the lease and hand-off scripts
        "+xclaim",  # lease renewal (XCLAIM ... JUSTID) and hand-off at shutdown, inside scripts
        "+xgroup|delconsumer",  # leaving the group at shutdown once holding nothing (script)
        "+xadd",  # dead-letter stream: in the dead-letter script (XADD, then XACK), or direct for too wide an entry
        "+evalsha",  # the Lua scripts (streamgroup.scripts) ...
        "+script|load",  # ... loaded once per server when EVALSHA answers NOSCRIPT
        *("+multi", "+exec", "+xrevrange"),  # too wide an entry: XADD + check script in MULTI (XDEL: below)
        "+get",  # the consumer-name lease (streamgroup.naming), inside its scripts: whose is it
        "+set",  # ... taken with an expiry
        "+pexpire",  # ... renewed, and given back at a clean stop (expired at once)
    ),
    "reclaimer": (
        "+xgroup|create",
        "+xautoclaim",  # taking over idle entries
        "+xpending",  # delivery counts; group metrics; inside the scripts
        "+xack",
        "+xclaim",  # each reclaimed entry as it is handled; lease renewal on it (script)
        "+xadd",  # dead-letter stream
        *("+multi", "+exec"),  # dead-lettering too wide an entry (XREVRANGE: below; XDEL: below)
        "+xlen",  # stream and dead-letter lengths (metrics)
        "+xinfo|groups",  # lag, pending, last delivered id (metrics; safe-retention script)
        "+xinfo|consumers",  # per-consumer metrics; idle-consumer cleanup script
        "+xgroup|delconsumer",  # removing idle consumers that hold nothing (script)
        "+xrevrange",  # safe retention: the newest RETENTION_MIN_ENTRIES entries (script)
        "+xtrim",  # safe retention: XTRIM MINID below what every group still needs (script)
        "+evalsha",
        "+script|load",
    ),
    # `streamgroup status`, or any monitoring that only reads.
    "status": ("+xlen", "+xinfo|groups", "+xinfo|consumers", "+xpending"),
    # `streamgroup dead-letters` (streamgroup.deadletters): list, show, replay, purge. Reading and
    # deleting only on the dead-letter streams: see DEAD_LETTER_ONLY.
    "dead-letters": (
        "+xadd",  # replay: into the source stream (inside the script, or direct for too wide an entry)
        "+evalsha",  # the replay script ...
        "+script|load",  # ... loaded once per server when EVALSHA answers NOSCRIPT
        "+script|exists",  # redis-py asks before sending a pipeline of scripts (replay sends 500 at a time)
    ),
}

# Commands allowed on the dead-letter stream(s) only (an ACL selector): the wide-entry dead-letter
# script deletes the copy it just added when the caller turns out not to own the entry any more;
# the dead-letters command reads, replays and purges there and nowhere else.
DEAD_LETTER_ONLY: Mapping[str, tuple[str, ...]] = {
    "consumer": ("+xdel",),
    "reclaimer": ("+xdel",),
    "dead-letters": (
        "+xrange",  # list and show; inside the replay script
        "+xrevrange",  # purge --all: the newest entry when asking
        "+xlen",  # purge --all: how many, for the question
        "+xdel",  # replay (inside the script) and purge by id
        "+xtrim",  # purge --all: MINID up to the newest entry seen when asking
    ),
}

# Key permissions per service: for the stream and for its dead-letter stream.
KEY_ACCESS: Mapping[str, tuple[str, str | None]] = {
    "producer": ("~", None),  # EVALSHA's declared keys need read and write; never sees the dead-letter stream
    "consumer": ("~", "~"),  # the dead-letter script declares both keys; EVALSHA needs read and write on them
    "reclaimer": ("~", "~"),  # adds to the dead-letter stream and measures it (XLEN)
    "status": ("%R~", "%R~"),
    "dead-letters": ("~", "~"),  # the replay script declares both: EVALSHA needs read and write on them
}

# Keys of the consumer-name lease (StreamKeys.consumer_name_lease), for any group and name.
NAME_LEASE_ACCESS: Mapping[str, str] = {"consumer": "~"}

_GLOB = "*?[]\\"


def escape_key_pattern(key: str) -> str:
    """An ACL key pattern matching exactly `key` (ACL patterns are globs)."""
    return "".join("\\" + char if char in _GLOB else char for char in key)


def rule(
    service: str,
    stream: str = "messageStream",
    dead_letter: str | None = None,
    client_setinfo: bool = True,
    shards: int = 1,
    previous_shards: int = 0,
    cluster: bool = False,
) -> list[str]:
    """The ACL SETUSER arguments (after `reset on >PASSWORD`) for one service on one stream: with
    `shards` (STREAMGROUP_SHARDS), every shard's keys, each named exactly; with `previous_shards`
    (STREAMGROUP_PREVIOUS_SHARDS), those of the layout being drained too (not for the producer);
    `cluster`: for a Redis Cluster (set on every node)."""
    if service not in COMMANDS:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    for key in (stream, dead_letter or ""):
        if any(char.isspace() for char in key):
            raise ValueError(f"key {key!r} contains white space, which an ACL rule cannot express")
    layout = shard_keys(stream, "", shards, dead_letter)
    if previous_shards and service != "producer":  # it writes only the new layout
        names = {keys.stream for keys in layout}
        layout += [keys for keys in shard_keys(stream, "", previous_shards, dead_letter) if keys.stream not in names]
    stream_access, dead_access = KEY_ACCESS[service]
    keys = []
    for shard in layout:
        keys.append(stream_access + escape_key_pattern(shard.stream))
        if service == "producer":
            keys.append("~" + escape_key_pattern(slot_prefix(shard.stream) + PRODUCER_RUN_INFIX) + "*")
        if dead_access is not None:
            keys.append(dead_access + escape_key_pattern(shard.dead_letter))
    if service in NAME_LEASE_ACCESS:
        # One lease per process, on the logical stream's key whatever the number of shards.
        keys.append(NAME_LEASE_ACCESS[service] + escape_key_pattern(slot_prefix(stream)) + ":*:consumer:*")
    commands = [
        *CONNECTION,
        *([CLIENT_SETINFO] if client_setinfo else []),
        *(CLUSTER if cluster else ()),
        *COMMANDS[service],
    ]
    seen: set[str] = set()
    commands = [c for c in commands if not (c in seen or seen.add(c))]
    selectors = []
    if service in DEAD_LETTER_ONLY:
        dead_keys = " ".join("~" + escape_key_pattern(shard.dead_letter) for shard in layout)
        selectors.append(f"({' '.join(DEAD_LETTER_ONLY[service])} {dead_keys})")
    return ["resetchannels", *keys, "-@all", *commands, *selectors]


def render(
    service: str,
    stream: str = "messageStream",
    dead_letter: str | None = None,
    shards: int = 1,
    cluster: bool = False,
) -> str:
    """One line, as in docs/security.md (for Redis 7.0, drop +client|setinfo)."""
    return " ".join(rule(service, stream, dead_letter, shards=shards, cluster=cluster))


def setuser_args(
    service: str,
    user: str,
    password: str,
    stream: str = "messageStream",
    dead_letter: str | None = None,
    client_setinfo: bool = True,
    shards: int = 1,
    previous_shards: int = 0,
    cluster: bool = False,
) -> list[str]:
    """The whole command, ready for client.execute_command(*args)."""
    granted = rule(service, stream, dead_letter, client_setinfo, shards, previous_shards, cluster)
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *granted]


def server_knows_client_setinfo(info: Mapping[str, object]) -> bool:
    """From INFO server: CLIENT SETINFO exists from Redis 7.2 on, and in every Valkey."""
    if "valkey_version" in info:
        return True
    major, minor = (int(part) for part in str(info["redis_version"]).split(".")[:2])
    return (major, minor) >= (7, 2)
