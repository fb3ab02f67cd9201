"""Errors meant for people: the CLI prints them as one line (what, where, how to fix)."""


class TunesmithError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(TunesmithError):
    """A config key or value is wrong. The message names the key and what is allowed."""


class DataError(TunesmithError):
    """A data file or record is wrong. The message names the file and line."""


class SaveError(TunesmithError):
    """Writing a checkpoint or the final artifacts failed (disk full, no permission, ...). The
    message says what failed and which earlier checkpoint is still intact."""
