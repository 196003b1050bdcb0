"""Errors that mean "the user asked for something wrong": the CLI prints them as one line."""


class UserError(Exception):
    """A mistake in the user's input (file, shape, dtype, mode, option). Printed without a
    traceback by the CLI, exit status 2. Library code raises more specific subclasses."""


class BackendUnavailableError(UserError, RuntimeError):
    """The named backend cannot serve this call; the message says why (a UserError: the user named
    it; still a RuntimeError for callers that caught it as one)."""


class DestinationError(UserError):
    """fastsr will not write there: the destination is or holds an input, exists (without
    ``--overwrite``) or is a folder fastsr did not write (never removed). See docs/safety.md."""
