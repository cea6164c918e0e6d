"""Errors a user can fix: entry points (CLI, Ray jobs) print these as one line and exit 2."""
from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (bad config, data, model or path)."""
    from flowers.models.checkpoint import ModelLoadError
    from flowers.config import ConfigError
    from flowers.data import DataError
    from flowers.models import ModelError
    from flowers.storage import StorageError
    from flowers.registry.tracking import TrackingError

    return (ConfigError, DataError, ModelError, ModelLoadError, StorageError, TrackingError, FileNotFoundError,
            PermissionError)
