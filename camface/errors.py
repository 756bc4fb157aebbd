"""Typed errors. Each message names the thing at fault (path, camera index, layer name)."""


class CamfaceError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""

    exit_code = 2


class SourceError(CamfaceError, ConnectionError):
    """A frame source (camera index, file, folder, URL) could not be opened or read."""


class ModelError(CamfaceError):
    """A model file is missing, corrupt or not what camface expects."""


class OutputError(CamfaceError):
    """An output path (recording, snapshot, figure) cannot be written."""


class UsageError(CamfaceError, ValueError):
    """A bad option value or argument (a flag, a keyword of `camface.load`, a frame of the
    wrong dtype or shape): the CLI prints the message on one line and exits 2."""
