"""Errors meant for users: the message names the file or key and the fix."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, missing or has an invalid value."""


class AudioError(UserError, ValueError):
    """An audio file cannot be used as 16 kHz mono speech."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or of the wrong kind."""
