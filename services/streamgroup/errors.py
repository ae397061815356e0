"""Failures that end a process, each with its own exit code (as dramatiq's RET_* codes)."""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_REDIS_REFUSED = 3


class ConfigError(Exception):
    """The configuration is wrong; each line names the variable at fault."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RedisRefusedError(Exception):
    """Redis answered, and the answer will not change by retrying (bad password, old server, wrong key type)."""

    exit_code = EXIT_REDIS_REFUSED


class PoisonMessage(Exception):
    """Raised by a handler to send its message to the dead-letter stream at once, without retries."""
