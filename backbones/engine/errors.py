"""One base class for every problem a user can fix: a config value, a dataset, a checkpoint, a path.

The tools catch :class:`ResdetError` alone, print its message (which names the file, the field and the fix)
and exit with 2; anything else is a bug in resdet and keeps its traceback. Each subclass also derives from
the built-in exception it refines (``ValueError``, ``FileNotFoundError``, ``OSError``), so code that caught
those before still does."""
from __future__ import annotations


class ResdetError(Exception):
    """A problem with what the user gave (config, data, weights, paths); the message says how to fix it."""


class ConfigError(ResdetError, ValueError):
    """A config file or override that does not fit the schema, or a value the run cannot use."""


class CheckpointError(ResdetError, ValueError):
    """A checkpoint or weights file that is missing or does not fit the model it is loaded into."""


class DatasetError(ResdetError, ValueError):
    """The dataset on disk is missing records or malformed: the annotation file, the image folder, the images."""


class DataNotFoundError(ResdetError, FileNotFoundError):
    """The configured dataset, or an input path, is not on disk."""
