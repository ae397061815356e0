"""Every Redis key this project touches is named here, so sharding or hash tags change one place."""

from __future__ import annotations

from dataclasses import dataclass

from streamgroup.settings import Settings

PRODUCER_RUN_INFIX = ":producer-run:"


@dataclass(frozen=True, slots=True)
class StreamKeys:
    stream: str
    group: str
    dead_letter: str

    def producer_run(self, run: str) -> str:
        """A producer run's marker: the last batch number of that run the stream holds."""
        return f"{self.stream}{PRODUCER_RUN_INFIX}{run}"

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamKeys:
        return cls(stream=settings.stream, group=settings.group, dead_letter=settings.dead_letter_key)
