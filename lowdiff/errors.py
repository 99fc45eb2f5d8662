"""The one error hierarchy: every problem with something a user gave is a :class:`LowDiffError`.

An error names what it concerns in ``field``: a flag, setting, request field or file role, written
in snake case (``checkpoint``, ``class_label``, ``engine_dir``). The two boundaries turn it into
what their users read: the command line prints one line naming the flag (``--class-label: …``)
and exits with status 2 (:mod:`lowdiff.cli`); the HTTP service answers 4xx with ``field`` in the
JSON body (:mod:`lowdiff.service.errors`). Nothing below those boundaries prints or exits.

This module imports nothing from the project: it is the bottom layer.
"""

from __future__ import annotations


class LowDiffError(Exception):
    """Base class: a message for a person, and the flag/field/file it concerns (or None)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    def for_field(self, field: str) -> LowDiffError:
        """The same error, re-aimed at another flag (``--data`` of train vs ``--reference`` of eval)."""
        other = type(self).__new__(type(self))
        LowDiffError.__init__(other, self.message, field)
        return other

    def one_line(self, flag_style: bool = True) -> str:
        """``--field: message`` (flags) or ``field: message``; the message alone without a field."""
        if self.field is None or self.message.startswith(f"LOWDIFF_{self.field.upper()}: "):
            return self.message  # no field, or the message names the environment variable it came from
        name = "--" + self.field.replace("_", "-") if flag_style else self.field
        prefix = f"{name}: "
        message = self.message
        for already in (f"{self.field}: ", prefix):  # do not name the field twice
            if message.startswith(already):
                message = message[len(already) :]
        return (prefix + message).replace("\n", " ")


class ConfigError(LowDiffError):
    """An unknown or invalid model config or schedule."""

    def __init__(self, message: str, field: str | None = "config"):
        super().__init__(message, field)


class CheckpointError(LowDiffError):
    """A checkpoint that is missing, unreadable, not a LowDiff checkpoint, or whose contents are wrong."""

    def __init__(self, message: str, field: str | None = "checkpoint"):
        super().__init__(message, field)


class DataError(LowDiffError):
    """A dataset that is missing, unreadable or not in a supported layout."""

    def __init__(self, message: str, field: str | None = "data"):
        super().__init__(message, field)


class ManifestError(LowDiffError):
    """An engine folder whose manifest or files are missing, tampered with, or made for another model."""

    def __init__(self, message: str, field: str | None = "engine_dir"):
        super().__init__(message, field)


class EngineUnavailable(LowDiffError):
    """The requested runtime is not usable on this machine (missing library or device)."""

    def __init__(self, message: str, field: str | None = "engine"):
        super().__init__(message, field)


class RequestError(LowDiffError):
    """A generation request (class label, seed, image count) that the model cannot serve."""


class SettingsError(LowDiffError):
    """A flag or environment variable with a bad value."""
