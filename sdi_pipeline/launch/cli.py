"""Command-line entry points: ``sdi-worker``, ``sdi-query``, ``sdi-score``, ``sdi-merge``,
``sdi-status``.

Arguments are ``key=value`` pairs, as in the launcher: ``sdi-worker run_dir=runs/x/abc
rank=3 world_size=8``, ``sdi-score run_dir=... rank=R world_size=W``, ``sdi-status
run_dir=... [verify=true]``. In a SLURM job array, rank and world size default to the array
task id and count. ``python -m sdi_pipeline.launch.cli <worker|query|score|merge|status> ...`` runs
the same entry points. A user mistake
prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from sdi_pipeline.errors import (
    EXIT_ATTENTION,
    EXIT_INTERRUPTED_BY_USER,
    EXIT_USER_ERROR,
    ConfigError,
    SDIError,
)


def parse_kv(
    argv: Sequence[str], required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, str]:
    """Parse ``key=value`` arguments; unknown or missing keys are errors."""
    known = set(required) | set(optional)
    out: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"arguments are key=value pairs, got '{arg}'")
        if key not in known:
            raise ConfigError(f"unknown argument '{key}'; expected {', '.join(sorted(known))}")
        out[key] = value
    missing = [k for k in required if k not in out]
    if missing:
        raise ConfigError(f"missing argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return out


def _int(args: dict[str, str], key: str) -> int:
    try:
        return int(args[key])
    except ValueError as err:
        raise ConfigError(f"{key} must be an integer, got '{args[key]}'") from err


def guarded(job: Callable[[list[str]], int]) -> Callable[[], None]:
    """Run a job's main; turn SDIError into one line on stderr and exit status 2 (see
    :mod:`sdi_pipeline.errors` for every status)."""

    def main() -> None:
        try:
            code = job(sys.argv[1:])
        except SDIError as err:
            print(f"error: {err}", file=sys.stderr)
            code = EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted: run the same command again to resume", file=sys.stderr)
            code = EXIT_INTERRUPTED_BY_USER
        sys.exit(code)

    return main


def _rank_args(argv: list[str]) -> tuple[str, int, int]:
    from sdi_pipeline.jobs.allocation import array_task_count, array_task_id

    args = parse_kv(argv, ["run_dir"], ["rank", "world_size"])
    rank = _int(args, "rank") if "rank" in args else array_task_id()
    world = _int(args, "world_size") if "world_size" in args else array_task_count()
    return args["run_dir"], rank, world


def _worker(argv: list[str]) -> int:
    from sdi_pipeline.jobs.worker import run_worker

    return run_worker(*_rank_args(argv))


def _score(argv: list[str]) -> int:
    from sdi_pipeline.jobs.score import run_score

    return run_score(*_rank_args(argv))


def _query(argv: list[str]) -> int:
    from sdi_pipeline.jobs.query import run_query

    return run_query(parse_kv(argv, ["run_dir"])["run_dir"])


def _merge(argv: list[str]) -> int:
    from sdi_pipeline.jobs.merge import run_merge

    return run_merge(parse_kv(argv, ["run_dir"])["run_dir"])


def _status(argv: list[str]) -> int:
    from sdi_pipeline.launch.status import format_status, run_status
    from sdi_pipeline.run.rundir import RunDir

    args = parse_kv(argv, ["run_dir"], ["verify"])
    verify = args.get("verify", "false").lower()
    if verify not in ("true", "false"):
        raise ConfigError(f"verify must be true or false, got '{args['verify']}'")
    run = RunDir.existing(args["run_dir"])
    status = run_status(run, verify=verify == "true")
    print(format_status(run, status))
    # Something needs attention: failed, stale or corrupt units, a stale results.h5.
    return 0 if status.healthy else EXIT_ATTENTION


JOBS = {
    "worker": _worker,
    "query": _query,
    "score": _score,
    "merge": _merge,
    "status": _status,
}
worker_main = guarded(_worker)
score_main = guarded(_score)
query_main = guarded(_query)
merge_main = guarded(_merge)
status_main = guarded(_status)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] not in JOBS:
        raise ConfigError(
            f"usage: python -m sdi_pipeline.launch.cli {{{','.join(JOBS)}}} key=value ..."
        )
    return JOBS[argv[0]](argv[1:])


if __name__ == "__main__":
    guarded(_dispatch)()
