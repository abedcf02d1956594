"""Errors a user can act on.

Every failure that comes from user input (a path, a model, a mix of features, a remote server)
is raised as a ``SaefeError`` subclass with a one-line message; the CLI prints that line and exits
with status 2 instead of showing a traceback.
"""


class SaefeError(Exception):
    """An error whose message is meant for the user, not a traceback."""


class ModelLoadError(SaefeError):
    """A model could not be loaded (offline, missing weights, wrong architecture)."""


class CorpusError(SaefeError):
    """The corpus is empty, unreadable or malformed."""


class IncompatibleError(SaefeError):
    """Two artefacts (index, SAE, labels, query) were made by different encoders or dimensions."""


class SteeringError(SaefeError):
    """A feature mix or label expression is invalid (unknown id/label, NaN weight, all zero)."""


class RemoteError(SaefeError):
    """A remote server (clip_server or search backend) is down or answered badly."""
