"""Capped exponential backoff with full jitter, for reconnecting to Redis."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    base_seconds: float = 0.1
    cap_seconds: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
