"""Runs: a trained model in a directory. :func:`train_run` trains (or resumes) one, :func:`load_run` reads one
back, :class:`Run` is either's result, and :class:`RunDirectory` is the directory's files and rules."""

from pyrovae.runs.directory import RunDirectory
from pyrovae.runs.run import Run, load_run, train_run

__all__ = ["Run", "RunDirectory", "load_run", "train_run"]
