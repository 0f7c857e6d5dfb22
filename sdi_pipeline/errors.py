"""Errors for problems the user can fix, by kind: config, data, checkpoints, run dir, model;
and the exit statuses of the command-line tools.

Every message names what is wrong and how to fix it. The CLIs print one ``error:`` line for
any :class:`SDIError` and exit with status 2; callers and tests tell the kinds apart by type.

Exit statuses (docs/reliability.md has the table): 0 done; 1 the run needs attention
(``sdi-attribute``: a job it ran failed, named with its error and log; ``sdi-status``: failed,
stale or corrupt files, or a stale results.h5); 2 a user error, refused in one line
(``sdi-attribute``: before any job started); 130 interrupted (Ctrl-C, SIGTERM, SIGHUP): the
same command resumes.
"""

from __future__ import annotations

EXIT_ATTENTION = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED_BY_USER = 130


class SDIError(Exception):
    """A problem the user can fix. The message names what is wrong and how to fix it."""


class ConfigError(SDIError):
    """A config value, override or command-line argument that is wrong or missing."""


class DataError(SDIError):
    """A dataset, batch or loss that cannot be used (empty, wrong shape, non-finite)."""


class CheckpointError(SDIError):
    """A checkpoint file that is missing, unreadable or does not fit the model."""


class RunDirError(SDIError):
    """A run directory, or a file in it, that does not match what the job expects."""


class MergeRefused(RunDirError):
    """The merge found the run incomplete or inconsistent; nothing was written."""


class UnsupportedModel(SDIError):
    """Targets or module calls the engine cannot attribute to loop steps exactly."""
