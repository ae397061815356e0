"""A handler module whose own import fails, as a user's package missing a dependency would."""

import streamgroup_test_missing_dependency  # noqa: F401


def handle(message) -> None:
    pass
