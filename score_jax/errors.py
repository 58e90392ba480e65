"""Errors a user can fix: main.py prints their message in one line, without a traceback.

Each subclasses the built-in exception it used to be (ValueError,
FileNotFoundError, ...), so code that catches those keeps working.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "WorkdirError"]


class UserError(Exception):
  """An error in what the user asked for (config, paths, files); the message says the fix."""


class ConfigError(UserError, ValueError):
  """A config key or value that cannot work."""


class WorkdirError(UserError, FileNotFoundError):
  """A workdir that is missing, not a folder, or holds nothing the mode needs."""
