"""A run's folder: claimed atomically by one live run, cleaned of what an earlier
run left, and its config.yaml written and checked against its checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from es_l2o.usage import UsageError

#: the lock file that marks a run folder as held by a live run
LOCK_NAME = ".run.lock"


class Claim(NamedTuple):
    """A run folder this process holds (an flock on RUN_DIR/.run.lock, released by
    the kernel when the process ends, however it ends)."""

    path: Path
    fd: int


def claim_run_dir(run_dir: Path, may_move: bool) -> Claim:
    """Claims `run_dir` for this run, atomically: a folder another live run holds is
    refused, or (`may_move`, the default timestamped folder) this run takes the next
    free `RUN_DIR_2`, `RUN_DIR_3`, ... instead."""
    import fcntl

    for attempt in range(1, 100):
        name = run_dir.name if attempt == 1 else f"{run_dir.name}_{attempt}"
        path = run_dir.with_name(name)
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if may_move:
                continue
            raise UsageError(
                f"run_dir={run_dir} is in use by another run ({owner or 'running'}); "
                "give another run_dir, or wait for that run to end"
            ) from None
        import socket

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return Claim(path, fd)
    raise UsageError(f"run_dir={run_dir}: 99 runs hold folders of that name")


def release(claim: Claim | None) -> None:
    if claim is not None:
        os.close(claim.fd)  # the lock file stays; its lock goes


def remove_empty(folder: Path) -> None:
    """Removes `folder` if it is empty (Hydra makes the output folder before the
    run checks its settings: a refused run leaves nothing behind)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _start_clean(run_dir: Path) -> None:
    """A new run in a folder whose earlier run stopped before its first checkpoint
    (nothing to resume): that run's metrics and theta go."""
    import shutil

    left = [run_dir / n for n in ("metrics.jsonl", "theta.safetensors", "summary.json")]
    left = [p for p in left if p.exists()]
    if (run_dir / "tensorboard").is_dir():
        shutil.rmtree(run_dir / "tensorboard")
        left.append(run_dir / "tensorboard")
    for path in left:
        if path.is_file():
            path.unlink()
    if left:
        print(
            f"run_dir={run_dir}: a run there stopped before its first checkpoint; "
            f"starting again (removed its {', '.join(p.name for p in left)})",
            flush=True,
        )


def _record_hydra(run_dir: Path) -> None:
    """Hydra's record of the launch (overrides, Hydra settings) in RUN_DIR/.hydra,
    written once the folder is claimed (Hydra's own writer would overwrite the files
    of another run that holds the folder)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    from es_l2o import files

    hydra_cfg = HydraConfig.get()
    overrides = OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task)))
    files.write_atomic(run_dir / ".hydra" / "overrides.yaml", overrides)
    files.write_atomic(
        run_dir / ".hydra" / "hydra.yaml",
        OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
    )


#: config keys a resumed run may change; everything else must match its config.yaml
RESUME_MAY_CHANGE = (
    "num_iterations",
    "progress",
    "checkpoint_every",
    "checkpoint_keep",
    "tensorboard",
    "sharding",
)


def config_digest(config: dict) -> str:
    """SHA-256 of a run's resolved settings, without those a resume may change
    (recorded in every checkpoint; a resume checks its config.yaml against it)."""
    kept = {
        k: v
        for k, v in config.items()
        if k not in (*RESUME_MAY_CHANGE, "resume", "run_dir")
    }
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_recorded_config(saved: dict, newest: Path, run_dir: Path) -> None:
    """Refuses to resume from a config.yaml that differs from the settings the
    checkpoint recorded (an edited config.yaml)."""
    from es_l2o import checkpoint as ckpt

    try:
        recorded = ckpt.record(newest).get("metadata", {}).get("config_sha256")
    except ckpt.CheckpointError:
        return  # the restore names the damage
    if recorded is not None and recorded != config_digest(saved):
        raise UsageError(
            f"resume={run_dir}: its config.yaml differs from the settings its "
            f"checkpoint {newest.name} recorded (edited after the run started); "
            "restore it, or start a new run with the new settings"
        )


def start_run_dir(cfg, run_dir: Path, newest: Path | None) -> str:
    """Writes config.yaml into the claimed run directory (cleaning what an earlier
    run or killed writes left); returns the digest of its settings."""
    from omegaconf import OmegaConf

    from es_l2o import files, sharding

    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["run_dir"], saved["resume"] = str(run_dir), None
    if newest is not None:
        _check_recorded_config(saved, newest, run_dir)
    if sharding.is_main_process():  # process 0 alone writes the run's files
        if newest is None:
            _start_clean(run_dir)
        for folder in (run_dir, run_dir / "checkpoints"):  # what killed writes left
            files.remove_temp_files(folder)
        files.write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(saved))
        _record_hydra(run_dir)
    print(f"run directory: {run_dir}", flush=True)
    if newest is not None:
        print(f"resuming from {newest}", flush=True)
    return config_digest(saved)
