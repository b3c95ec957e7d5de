"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (a file, an option, a recipe); `exit_code` is the process status."""

    exit_code = 1


class ConfigError(UserError):
    """A recipe or override that does not fit the config schema."""

    exit_code = 2
