"""Errors of the model layer: plain Python exceptions, no gRPC.

The server maps them to status codes in one place (`rmserve.service.server.errors`);
the trainer and the CLI show their messages as they are. Every message is
written for the user who can fix the cause.
"""

from __future__ import annotations


class RMServeError(Exception):
    """Base of everything rmserve raises on purpose; the message is for the user."""


class InvalidInput(RMServeError):
    """The input itself is wrong: fixing the input fixes it."""


class EnsembleFormatError(RMServeError, ValueError):
    """A model directory that rmserve cannot read as an ensemble (the message names the file)."""


class EngineOutOfMemory(RMServeError, RuntimeError):
    """One sequence alone does not fit in memory: splitting the batch cannot help."""


class EngineUnavailable(RMServeError, RuntimeError):
    """The engine cannot score right now for a reason that may pass (a remote engine's retryable
    failure): the caller should retry, as for any UNAVAILABLE."""
