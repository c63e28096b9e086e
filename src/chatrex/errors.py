"""Typed errors shared by every layer. Each message says what went wrong and what to do."""

from __future__ import annotations


class ChatRexError(Exception):
    """Base class of every error raised on purpose by chatrex."""


class InvalidImageError(ChatRexError, ValueError):
    """An image could not be read or is in a form we cannot process."""


class CheckpointError(ChatRexError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model (see the key report)."""


class ConfigError(ChatRexError, ValueError):
    """A configuration is inconsistent or names an unknown preset."""


class TooManyBoxesError(ChatRexError, ValueError):
    """More boxes than the model has object tokens for."""


class MissingWeightsError(ChatRexError, FileNotFoundError):
    """No weights were given (or found) for a model that needs them."""
