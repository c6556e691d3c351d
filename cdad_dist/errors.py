"""Error types. Every error a user can cause names the file, key or class at fault."""
from __future__ import annotations


class CdadError(ValueError):
    """Base class of all user-facing errors of cdad-dist."""


class ConfigError(CdadError):
    """A config file or override has an unknown key, a wrong type or an invalid value."""


class DatasetError(CdadError):
    """A dataset tree is missing files, has a bad layout or holds an unreadable image or mask."""


class ShardError(CdadError):
    """A shard is missing, truncated, corrupt, or does not match its manifest."""


class RunWriteError(CdadError):
    """A run could not write a file (read-only output, full disk); the message says what is saved."""


class CheckpointError(CdadError):
    """A checkpoint is missing, incomplete, or belongs to another model preset / sequence / run."""
