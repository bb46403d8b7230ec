"""Errors a user can act on. Each carries the HTTP status the server answers with (API.md, Errors)."""

from __future__ import annotations


class GlimpseError(Exception):
    """Base of every error caused by a request's input. `status` is the HTTP status it maps to."""

    status: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(GlimpseError):
    """400: malformed or invalid input (bad fields, undecodable media, a URL not allowed, too long a prompt)."""


class MediaError(InvalidRequestError):
    """400: a media item that can't be fetched or decoded, or whose source is not allowed."""


class LimitExceededError(GlimpseError):
    """413: the body or one media item is over a size, pixel, duration, frame or page limit."""

    status = 413


class AuthenticationError(GlimpseError):
    status = 401
    error_type = "authentication_error"


class NotFoundError(GlimpseError):
    status = 404
    error_type = "not_found_error"


class CheckpointError(Exception):
    """A checkpoint that can't be loaded: missing, unexpected or mis-shaped tensors, bad config."""
