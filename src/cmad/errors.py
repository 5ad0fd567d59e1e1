"""Project exceptions. Every error a user can cause names the file and what is wrong."""
from __future__ import annotations

from pathlib import Path


class CmadError(Exception):
    """Base class for all errors raised by cmad on purpose."""


class DataError(CmadError):
    """A dataset file or folder is missing, mis-paired, unreadable or of the wrong shape."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ModelFormatError(CmadError):
    """A saved model is truncated, from another format version, or from another extractor."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(CmadError):
    """An option or configuration value is invalid."""


class OutputError(CmadError):
    """An output cannot be written: the path is taken by something else, or the disk failed."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)
