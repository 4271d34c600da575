"""Running a task as a Hydra application: Hydra's flags checked, its lines shown,
the task's errors, SIGTERM and Ctrl-C reported in one line with an exit status."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from es_l2o.hydra_config import config_dir, register
from es_l2o.usage import SIGNAL_EXIT_BASE, USAGE_ERROR, Stopped, UsageError, one_line

#: errors a task reports in one line (exit code 2), and a stopped run
_TASK_ERRORS = (UsageError, OSError, MemoryError)
#: what the task of a single run raised: re-raised by `run_app` after Hydra returns
#: (raised inside the task, Hydra would first print its own line about the job)
_FAILED: list[BaseException] = []


def _single_run() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.RUN


def _reported(task):
    """`task` whose errors in a single run are kept for `run_app` to report (in a
    sweep they go to Hydra, which names the failed job)."""

    def run(cfg) -> None:
        try:
            task(cfg)
        except (*_TASK_ERRORS, Stopped) as err:
            if not _single_run():
                raise
            _FAILED.append(err)

    return run


def _check_flags(program: str, argv: list[str]) -> None:
    """Hydra's flags in `argv` parsed once, a bad one as a UsageError (argparse would
    print its whole usage)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = program

    def error(message: str):
        raise UsageError(f"{message} (see {program} --help)")

    parser.error = error
    parser.parse_args(argv)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record comes (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        del value


def _show_hydra_lines() -> None:
    """Hydra's INFO lines ("Launching 2 jobs locally", each job's overrides) on
    stdout. (Hydra's own logging setup, turned off in the configs, would close
    every logging handler that exists and raise the root logger to INFO.)"""
    for name in ("hydra", "hydra_plugins"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
            handler = _StdoutHandler()
            handler.setFormatter(logging.Formatter("[HYDRA] %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _stopped_line(program: str, signum: int) -> str:
    return (
        f"{program}: stopped by {signal.Signals(signum).name} outside "
        "meta-training; a run that wrote a checkpoint continues with "
        "es-l2o-train resume=RUN_DIR"
    )


def _exit_on_sigterm(program: str):
    """The SIGTERM handler outside meta-training (which handles it itself): one
    line, then exit 128 + 15 at once. The handler does not raise: a signal may land
    in a callback whose exceptions Python ignores (a gc callback: the run would go
    on) or in an extension module's start-up (a crash). Files are written
    atomically and the run folder's lock goes with the process, so nothing is left
    half done."""

    def handler(signum, frame) -> None:
        del frame
        with contextlib.suppress(OSError):
            os.write(2, (_stopped_line(program, signum) + "\n").encode())
        os._exit(SIGNAL_EXIT_BASE + signum)

    return handler


class _JobErrorFilter:
    """stderr with Hydra's "Error executing job with overrides: [...]" line held
    back: a failed sweep job is then reported in one line that names its overrides.
    Everything else passes through as it comes."""

    PREFIX = "Error executing job with overrides: "

    def __init__(self, stream):
        self.stream, self.job = stream, None

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            import ast

            listed = text[len(self.PREFIX) :].strip()
            with contextlib.suppress(ValueError, SyntaxError):
                listed = " ".join(ast.literal_eval(listed))
            self.job = listed
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def run_app(program: str, config_name: str, task, argv: list[str]) -> int:
    """Runs `task` as the Hydra application `program` over `argv` (Hydra's flags
    and overrides); Hydra's and the task's errors become one line and exit code 2
    (HYDRA_FULL_ERROR=1 shows their tracebacks instead)."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    _show_hydra_lines()
    app = hydra.main(
        config_path=str(config_dir()), config_name=config_name, version_base=None
    )(_reported(task))
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved_argv = sys.argv
    sys.argv = [program, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises: the one line is ours
    _FAILED.clear()
    stderr = sys.stderr = _JobErrorFilter(sys.stderr)
    try:
        _check_flags(program, argv)
        app()
        if _FAILED:
            raise _FAILED.pop()
    except SystemExit as done:  # --help, --info, argparse's usage errors
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    except (
        UsageError,
        HydraException,
        OmegaConfBaseException,
        OSError,
        MemoryError,
    ) as err:
        if full_error:
            raise
        job = f"job {stderr.job}: " if stderr.job else ""
        print(f"{program}: error: {job}{one_line(err)}", file=stderr.stream, flush=True)
        return USAGE_ERROR
    finally:
        sys.stderr = stderr.stream
        sys.argv = saved_argv
        if not full_error:
            del os.environ["HYDRA_FULL_ERROR"]
    return 0


def stopping_lines(program: str, body) -> int:
    """`body()` with SIGTERM, Ctrl-C and a stopped meta-training each reported in
    one line with their exit status."""
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave them alone
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm(program))
    try:
        return body()
    except Stopped as stopped:
        print(f"{program}: {stopped}", file=sys.stderr, flush=True)
        return stopped.code
    except KeyboardInterrupt:
        print(_stopped_line(program, signal.SIGINT), file=sys.stderr, flush=True)
        return SIGNAL_EXIT_BASE + signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
