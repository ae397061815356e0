"""The one typed settings object, read from STREAMGROUP_* environment variables."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamgroup.errors import ConfigError

ENV_PREFIX = "STREAMGROUP_"
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")

PositiveMs = Annotated[int, Field(gt=0, le=86_400_000)]


def default_consumer_name() -> str:
    """Kubernetes gives each pod its name in HOSTNAME; POD_NAME is the downward-API convention."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Connection. The password may sit in the URL or, better, in a mounted secret file.
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_password_file: FilePath | None = None
    redis_ca_file: FilePath | None = None
    redis_cert_file: FilePath | None = None
    redis_key_file: FilePath | None = None
    redis_timeout_ms: PositiveMs = 10_000
    # Deployment (streamgroup.topology): auto asks the URL's server whether it is a cluster node;
    # sentinel finds the primary through the sentinels (the URL then gives credentials, TLS, db).
    redis_mode: Literal["auto", "standalone", "cluster", "sentinel"] = "auto"
    redis_sentinels: str | None = Field(None, min_length=1)
    redis_sentinel_master: str | None = Field(None, min_length=1)

    # What to work on.
    stream: str = Field("messageStream", min_length=1)
    group: str = Field("messageGroup", min_length=1)
    consumer_name: str = Field(default_factory=default_consumer_name, min_length=1)
    dead_letter_stream: str | None = Field(None, min_length=1)
    # Where a group that never existed starts; a group that vanishes under running services is
    # recreated where they last read instead.
    group_start_id: Literal["0", "$"] = "0"
    # Sharded streams (streamgroup.keys.shard_keys): one logical stream as N stream keys. With 1,
    # every key is named as without sharding.
    shards: int = Field(1, ge=1, le=1024)
    # The message field whose value picks the shard (same value, same shard, order kept); none: round-robin.
    partition_field: str | None = Field(None, min_length=1)
    # While changing STREAMGROUP_SHARDS: the number before the change (0: no change under way).
    # Consumers and the reclaimer also read that layout's shards until they are drained.
    previous_shards: int = Field(0, ge=0, le=1024)

    # Observability.
    metrics_port: int = Field(9180, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Consumer.
    handler: str = Field("streamgroup.handlers:log_message", pattern=r"^[\w.]+:[\w.]+$")
    batch_size: int = Field(100, gt=0, le=10_000)
    block_ms: PositiveMs = 2000
    concurrency: int = Field(1, gt=0, le=1024)
    read_ahead: bool = True
    shutdown_grace_seconds: float = Field(20.0, gt=0, le=3600)
    max_deliveries: int = Field(5, ge=1, le=1_000_000)
    # 0 = no limit. A call past it fails (async: cancelled; sync: its thread is abandoned).
    handler_timeout_ms: int = Field(300_000, ge=0, le=86_400_000)
    # How long a consumer name stays taken after its process stopped renewing it (a twin waits that long).
    consumer_name_lease_ms: int = Field(10_000, ge=1000, le=3_600_000)

    # Producer.
    producers: int = Field(1, gt=0, le=100_000)
    producer_interval_ms: int = Field(1000, ge=0, le=86_400_000)
    max_messages: int = Field(0, ge=0)

    # Reclaimer.
    claim_min_idle_ms: PositiveMs = 60_000
    reclaim_interval_ms: PositiveMs = 5000
    consumer_delete_idle_ms: int = Field(600_000, ge=0, le=30 * 86_400_000)
    active_consumer_idle_ms: PositiveMs = 60_000
    retention_enabled: bool = False
    retention_min_entries: int = Field(0, ge=0)
    # Group gauges are collected by their own task on this interval (None: RECLAIM_INTERVAL_MS),
    # apart from reclaim passes.
    group_metrics_interval_ms: PositiveMs | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in REDIS_URL_SCHEMES:
            raise ValueError(f"URL scheme must be one of {', '.join(REDIS_URL_SCHEMES)}, not {scheme!r}")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_addresses(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        sentinel_given = self.redis_sentinels is not None or self.redis_sentinel_master is not None
        if self.redis_mode == "sentinel" or (self.redis_mode == "auto" and sentinel_given):
            if self.redis_sentinels is None or self.redis_sentinel_master is None:
                raise ValueError(
                    "Sentinel needs both STREAMGROUP_REDIS_SENTINELS (host:port,...) and "
                    "STREAMGROUP_REDIS_SENTINEL_MASTER (the name the sentinels monitor)"
                )
        elif sentinel_given:
            raise ValueError(
                "STREAMGROUP_REDIS_SENTINELS and STREAMGROUP_REDIS_SENTINEL_MASTER apply only with "
                f"STREAMGROUP_REDIS_MODE=sentinel or auto, not {self.redis_mode}"
            )
        url = urlsplit(self.redis_url.get_secret_value())
        if self.redis_mode in ("cluster", "sentinel") and url.scheme == "unix":
            raise ValueError(
                f"STREAMGROUP_REDIS_MODE={self.redis_mode} needs a redis:// or rediss:// STREAMGROUP_REDIS_URL, "
                "not a unix socket"
            )
        if self.redis_mode == "cluster" and self.redis_db != 0:
            raise ValueError("STREAMGROUP_REDIS_URL: a Redis Cluster has only database 0, the URL names another")
        if (self.redis_cert_file is None) != (self.redis_key_file is None):
            raise ValueError("STREAMGROUP_REDIS_CERT_FILE and STREAMGROUP_REDIS_KEY_FILE go together")
        if self.dead_letter_stream == self.stream:
            raise ValueError("STREAMGROUP_DEAD_LETTER_STREAM must differ from STREAMGROUP_STREAM")
        return self

    @property
    def redis_db(self) -> int:
        """The database number the URL names (its path, or a `db` query argument); 0 if none."""
        parts = urlsplit(self.redis_url.get_secret_value())
        query = dict(parse_qsl(parts.query))
        text = query.get("db") or (parts.path.strip("/") if parts.scheme != "unix" else "") or "0"
        return int(text) if text.isdigit() else 0

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return parse_addresses(self.redis_sentinels or "")

    @property
    def group_metrics_interval_seconds(self) -> float:
        return (self.group_metrics_interval_ms or self.reclaim_interval_ms) / 1000.0

    @property
    def dead_letter_key(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def redis_url_redacted(self) -> str:
        """The URL for logs: the password (in the user part or a `?password=` query argument) as ***."""
        parts = urlsplit(self.redis_url.get_secret_value())
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{hostport}"
        query = urlencode(
            [
                (name, "***" if "password" in name.lower() else value)
                for name, value in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return parts._replace(netloc=netloc, query=query).geturl()


# Kubernetes injects these for every Service in the namespace (unless enableServiceLinks is false);
# a Service named streamgroup-redis lands in our prefix. Ignored when both the name and the value
# have the shape Kubernetes gives them, so a real typo (STREAMGROUP_REDIS_PROT=x) is still refused.
_SERVICE_LINK = re.compile(
    r"(?:[A-Z0-9_]+?_)?(?:"
    r"(?P<host>SERVICE_HOST)"
    r"|(?P<port>SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_\d+_(?:TCP|UDP|SCTP)_PORT)"
    r"|(?P<addr>PORT_\d+_(?:TCP|UDP|SCTP)_ADDR)"
    r"|(?P<proto>PORT_\d+_(?:TCP|UDP|SCTP)_PROTO)"
    r"|(?P<url>PORT|PORT_\d+_(?:TCP|UDP|SCTP))"
    r")"
)
_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9.]+|[0-9A-Fa-f:]+):\d{1,5}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def is_service_link(name: str, value: str) -> bool:
    """A variable Kubernetes injected for some Service (by its name's and value's shape)."""
    match = _SERVICE_LINK.fullmatch(name.removeprefix(ENV_PREFIX))
    if not name.startswith(ENV_PREFIX) or match is None:
        return False
    if match["host"] or match["addr"]:
        return _is_ip(value)
    if match["port"]:
        return value.isdigit() and 0 < int(value) < 65536
    if match["proto"]:
        return value in ("tcp", "udp", "sctp")
    url = _LINK_URL.fullmatch(value)
    return url is not None and _is_ip(url["host"])


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and not is_service_link(name, environ[name]):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{name}: unknown variable{hint}")
    return problems


def _describe(error: dict) -> str:
    location = error["loc"]
    if location:
        name = ENV_PREFIX + str(location[0]).upper()
    else:  # a cross-field rule: its message names the variables itself
        return str(error["msg"]).removeprefix("Value error, ")
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str) and "url" not in name.lower():
        message += f" (got {given!r})"
    return f"{name}: {message}"


def load_settings() -> Settings:
    """Build the settings from the environment, or raise ConfigError with one line per problem."""
    problems = _unknown_variables(os.environ)
    settings = None
    try:
        settings = Settings()
    except ValidationError as exc:
        problems += [_describe(error) for error in exc.errors(include_url=False)]
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """'host:port,host:port' (an IPv6 host in brackets) as [(host, port), ...]."""
    addresses = []
    for item in text.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port[,host:port...], got {item.strip()!r} in it")
        addresses.append((host, int(port)))
    return addresses


def read_password_file(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\r\n")
