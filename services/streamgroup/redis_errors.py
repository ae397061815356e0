"""What a failure talking to Redis means for a service: an outage to wait out, or a refusal no
retry can change. The one place that decides it, by exception class where redis-py has one (it
strips the reply's prefix: `-MASTERDOWN ...` arrives as MasterDownError('...')), by the reply's
first word otherwise (`BUSY`, `UNBLOCKED`, `NOGROUP` have no class of their own).

A reply nobody foresaw is treated as an outage too, logged loudly: exiting would only restart the
process into the same reply, a crash loop, while waiting costs nothing and recovers by itself.
Extend KINDS_BY_CLASS / KINDS_BY_PREFIX rather than adding another list elsewhere.

A Redis Cluster adds its own: CLUSTERDOWN and TRYAGAIN replies, MOVED/ASK redirects that outlast
redis-py's own following (a slot moving back and forth, a failover half done), and the cluster
client's RedisClusterException (not even a RedisError: no node reachable, a slot nobody serves,
SlotNotCoveredError) and ClusterError (redirects that never settled). All are outages; so is
Sentinel's MasterNotFoundError (a ConnectionError: no sentinel names a primary right now).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import exceptions as rx

from streamgroup.errors import RedisRefusedError

# Checked in order: subclasses before their bases (AuthenticationError is a ConnectionError,
# MasterDownError a ClusterDownError).
REFUSED_CLASSES: tuple[type[BaseException], ...] = (
    RedisRefusedError,
    rx.AuthenticationError,
    rx.AuthorizationError,
    rx.AuthenticationWrongNumberOfArgsError,
    rx.NoPermissionError,
)
REFUSED_PREFIXES: tuple[str, ...] = ("WRONGTYPE", "NOAUTH", "WRONGPASS", "NOPERM")

KINDS_BY_CLASS: list[tuple[type[BaseException], str]] = [
    (rx.BusyLoadingError, "loading"),
    (rx.MasterDownError, "masterdown"),
    (rx.ClusterDownError, "clusterdown"),
    (rx.TryAgainError, "tryagain"),
    (rx.AskError, "redirect"),  # MovedError too (a subclass)
    (rx.ClusterError, "cluster"),
    (rx.RedisClusterException, "cluster"),
    (rx.OutOfMemoryError, "oom"),
    (rx.ReadOnlyError, "readonly"),
    (rx.TimeoutError, "timeout"),
    (TimeoutError, "timeout"),
    (rx.ConnectionError, "connection"),
    (ConnectionError, "connection"),
    (OSError, "connection"),
    (rx.InvalidResponse, "connection"),
]
KINDS_BY_PREFIX: list[tuple[str, str]] = [
    ("BUSY ", "busy"),  # a script or module command runs long elsewhere ("BUSYGROUP" is not this)
    ("UNBLOCKED", "unblocked"),  # Redis 7.0: the stream was deleted under a blocked XREADGROUP
    ("NOGROUP", "nogroup"),  # the stream or group vanished; the worker recreates it on its next run
    ("NOREPLICAS", "noreplicas"),  # min-replicas-to-write not met: the primary lost its replicas for now
    ("LOADING", "loading"),
    ("MASTERDOWN", "masterdown"),
    ("CLUSTERDOWN", "clusterdown"),
    ("TRYAGAIN", "tryagain"),
    ("OOM", "oom"),
    ("READONLY", "readonly"),
]
UNEXPECTED = "unexpected"

OUTAGE_KINDS: tuple[str, ...] = tuple(
    dict.fromkeys([kind for _, kind in KINDS_BY_CLASS + KINDS_BY_PREFIX] + [UNEXPECTED])
)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # an OUTAGE_KINDS label, or "refused"
    refused: bool  # True: retrying cannot help (exit 3); False: an outage, retried with backoff

    @property
    def expected(self) -> bool:
        return self.kind != UNEXPECTED


REFUSED = Verdict("refused", refused=True)


def classify(exc: BaseException) -> Verdict | None:
    """The verdict on a failure while talking to Redis; None when it is not one (a bug here)."""
    if isinstance(exc, REFUSED_CLASSES):
        return REFUSED
    text = str(exc)
    if isinstance(exc, rx.ResponseError) and text.startswith(REFUSED_PREFIXES):
        return REFUSED
    for cls, kind in KINDS_BY_CLASS:
        if isinstance(exc, cls):
            return Verdict(kind, refused=False)
    if isinstance(exc, rx.ResponseError):
        for prefix, kind in KINDS_BY_PREFIX:
            if text.startswith(prefix):
                return Verdict(kind, refused=False)
        return Verdict(UNEXPECTED, refused=False)
    if isinstance(exc, rx.RedisError) and not isinstance(exc, rx.DataError):
        return Verdict(UNEXPECTED, refused=False)
    return None


def is_outage(exc: BaseException) -> bool:
    verdict = classify(exc)
    return verdict is not None and not verdict.refused


def refusal_text(exc: BaseException) -> str:
    """What to tell the operator about a refusal, in words they can act on."""
    text = str(exc)
    if isinstance(exc, RedisRefusedError):
        return text
    code = getattr(exc, "status_code", None) or text.partition(" ")[0]
    if code == "NOAUTH":
        return "NOAUTH: set STREAMGROUP_REDIS_PASSWORD_FILE or a password in the URL"
    if code == "WRONGPASS" or isinstance(exc, rx.AuthenticationError):
        return f"WRONGPASS: Redis refused the user name or password ({text})"
    if code == "NOPERM" or isinstance(exc, rx.NoPermissionError):
        return f"NOPERM: the Redis user lacks a permission streamgroup needs, see docs/security.md ({text})"
    return f"Redis refused us: {text}"
