"""A run over two processes (JAX's multi-controller runtime on localhost, 4 forced CPU
devices each, gloo collectives) meta-trains exactly as one process over 8 devices;
its checkpoints (each process writing its own shards) resume with two processes or
one; kill -9 of one process stops the other with one clear message.

Every run is `python -m es_l2o.cli` in children capped in time and memory; runs that
do not depend on each other run at the same time, and one uninterrupted run serves
several comparisons.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from xla_flags import with_devices

from es_l2o import checkpoint, export, files

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 240  # seconds per child
MEMORY_CAP = 6 << 30  # bytes of address space per child
KILL_BOUND = 60  # seconds within which the survivor of a kill -9 must stop
N = 12  # meta-iterations of the FullES runs
TINY = [
    "population=quadratic",
    "system.horizon=4",
    "es.population_size=8",
    "lopt.hidden_sizes=[4]",
    "evaluation.num_tasks=2",
    "evaluation.learning_rates=[1e-3]",
    "meta_validation.every=0",
    "progress=false",
]
FULL_ES = [*TINY, f"num_iterations={N}", "checkpoint_keep=3"]
PES = [
    *TINY,
    "es=pes",
    "es.truncation_length=2",
    "system.horizon=[4,8]",
    "system.stagger=true",
    "num_iterations=3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


class Launch:
    """One run: `processes` children of `python -m es_l2o.cli`, each with
    `devices` forced CPU devices; with `distributed`, a coordinator on 127.0.0.1
    (also for one process: gloo collectives, as in the two-process run)."""

    def __init__(self, root, name, args, *, processes, devices, distributed=True):
        self.name, self.root = name, Path(root)
        self.run_dir = self.root / name
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=with_devices(devices)["XLA_FLAGS"],
        )
        # no persistent compilation cache: only process 0 writes it, so process 0
        # of a later run would load its programs while process 1 compiles them, and
        # gloo gives processes only 30 s to meet at their first collective
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        port = _free_port()
        self.procs, self.logs = [], []
        for index in range(processes):
            extra = []
            if distributed:
                extra = [
                    f"sharding.coordinator_address=127.0.0.1:{port}",
                    f"sharding.num_processes={processes}",
                    f"sharding.process_id={index}",
                ]
            log = self.root / f"{name}.{index}.log"
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "es_l2o.cli", *args, *extra],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        preexec_fn=_cap,
                    )
                )
            self.logs.append(log)
        self.started = time.monotonic()

    def wait(self) -> list[int]:
        """Every child's exit status (killed past the time limit: then -9)."""
        codes = []
        for proc in self.procs:
            left = max(1.0, TIME_LIMIT - (time.monotonic() - self.started))
            try:
                codes.append(proc.wait(left))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    def output(self, index: int = 0) -> str:
        return self.logs[index].read_text()


def _run_args(launch_name, root, args):
    return [*args, f"run_dir={Path(root) / launch_name}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full2 / full1: FullES over 2 processes x 4 devices and over 1 process x 8
    devices; pes2 / pes1: the same for PES; victim: full2's run, its process 1
    killed (-9) after its first checkpoint, then resumed by 2 processes; full2's
    checkpoint of iteration N/2 resumed by 1 process without jax.distributed."""
    root = tmp_path_factory.mktemp("multiprocess")
    started = time.monotonic()

    def launch(name, args, **kw):
        return Launch(root, name, _run_args(name, root, args), **kw)

    out = {"root": root}
    # three rounds of at most 5 processes (the second round's kill depends on the
    # first round's runs being done; the third resumes the first two rounds' runs)
    first = {
        "full2": launch(
            "full2", [*FULL_ES, "checkpoint_every=6"], processes=2, devices=4
        ),
        "pes2": launch("pes2", PES, processes=2, devices=4),
    }
    for name, run in first.items():
        out[name] = (run, run.wait())
    rounds = [time.monotonic() - started]
    second = {
        "full1": launch(
            "full1", [*FULL_ES, "checkpoint_every=6"], processes=1, devices=8
        ),
        "pes1": launch("pes1", PES, processes=1, devices=8),
        "victim": launch(
            "victim",
            [*FULL_ES, "checkpoint_every=1", "sharding.heartbeat_timeout_seconds=10"],
            processes=2,
            devices=4,
        ),
    }
    victim = second["victim"]
    deadline = time.monotonic() + TIME_LIMIT
    while not checkpoint.checkpoints(victim.run_dir / "checkpoints"):
        assert all(p.poll() is None for p in victim.procs), victim.output()[-3000:]
        assert time.monotonic() < deadline, "the victim wrote no checkpoint"
        time.sleep(0.01)
    victim.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        victim.procs[0].wait(KILL_BOUND)
        out["survivor_s"] = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        out["survivor_s"] = None
    for name, run in second.items():
        out[name] = (run, run.wait())
    rounds.append(time.monotonic() - started - sum(rounds))
    out["victim_at"] = checkpoint.iteration_of(
        checkpoint.latest(victim.run_dir / "checkpoints")
    )
    # resume the victim with 2 processes; full2's middle checkpoint with 1 process
    half = root / "half1"
    shutil.copytree(root / "full2", half, ignore=shutil.ignore_patterns("jax_cache"))
    shutil.rmtree(checkpoint.checkpoint_path(half / "checkpoints", N))
    (half / "optimizer.safetensors").unlink()
    third = {
        "victim_resumed": Launch(
            root,
            "victim_resumed",
            [f"resume={victim.run_dir}", "checkpoint_every=6"],
            processes=2,
            devices=4,
        ),
        "half1": Launch(
            root,
            "half1_resumed",
            [f"resume={half}"],
            processes=1,
            devices=8,
            distributed=False,
        ),
    }
    for name, run in third.items():
        out[name] = (run, run.wait())
    out["seconds"] = time.monotonic() - started
    rounds.append(out["seconds"] - sum(rounds))
    print(
        f"\nmultiprocess runs: {out['seconds']:.0f} s in all (rounds "
        f"{', '.join(f'{r:.0f}' for r in rounds)} s; survivor stopped "
        f"{out['survivor_s'] or float('nan'):.1f} s after the kill)"
    )
    return out


def _ok(runs, name):
    run, codes = runs[name]
    for index, code in enumerate(codes):
        assert code == 0, f"{name} process {index}: {run.output(index)[-3000:]}"
    return run


def _theta(run_dir):
    _, theta, _ = export.load_theta(Path(run_dir) / "optimizer.safetensors")
    return [np.asarray(x) for x in jax.tree.leaves(theta)]


def _records(run_dir):
    """metrics.jsonl without the wall times."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "wall_time_s"}
        for line in lines
    ]


def _final_arrays(run_dir):
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    record, arrays = checkpoint.arrays(path)
    return record["iteration"], arrays


def _same_bits(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    return (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert _same_bits(x, y)


@pytest.mark.parametrize("name", ["full", "pes"])
def test_two_processes_train_exactly_as_one_process_on_eight_devices(runs, name):
    two, one = _ok(runs, f"{name}2"), _ok(runs, f"{name}1")
    _assert_bitwise(_theta(two.run_dir), _theta(one.run_dir))
    # the whole state of the final checkpoint, read by this one-device process
    (it2, arrays2), (it1, arrays1) = (
        _final_arrays(two.run_dir),
        _final_arrays(one.run_dir),
    )
    assert it2 == it1 and sorted(arrays2) == sorted(arrays1)
    for path in arrays2:  # every bit (NaNs too: evosax's unset best solution)
        assert _same_bits(arrays2[path], arrays1[path]), path
    # process 0 alone wrote the run's files; each process its own shards (PES
    # keeps every particle's inner state, split over both processes' devices;
    # FullES's state is replicated, written once, by process 0)
    assert _records(two.run_dir) == _records(one.run_dir)
    newest = checkpoint.latest(two.run_dir / "checkpoints")
    writers = sorted(p.name for p in (newest / "state").glob("ocdbt.process_*"))
    expected = 2 if name == "pes" else 1
    assert writers == [f"ocdbt.process_{i}" for i in range(expected)]
    assert "meta-trained" in two.output(0) and "meta-trained" not in two.output(1)
    assert not files.temp_files(two.run_dir)


def test_kill_9_stops_the_other_process_and_two_processes_resume_bitwise(runs):
    victim, codes = runs["victim"]
    assert codes[1] == -signal.SIGKILL
    assert 1 <= runs["victim_at"] < N, "killed mid-run, after a checkpoint"
    assert runs["survivor_s"] is not None, (
        f"process 0 still ran {KILL_BOUND} s after the kill: "
        + victim.output(0)[-3000:]
    )
    assert codes[0] == 3, victim.output(0)[-3000:]
    message = [line for line in victim.output(0).splitlines() if "lost another" in line]
    assert len(message) == 1 and f"resume={victim.run_dir}" in message[0]
    assert "Traceback" not in victim.output(0)
    resumed = _ok(runs, "victim_resumed")
    del resumed
    full2 = _ok(runs, "full2")
    _assert_bitwise(_theta(victim.run_dir), _theta(full2.run_dir))
    assert _records(victim.run_dir) == _records(full2.run_dir)
    (it, arrays), (ref_it, ref_arrays) = (
        _final_arrays(victim.run_dir),
        _final_arrays(full2.run_dir),
    )
    assert it == ref_it == N
    assert sorted(arrays) == sorted(ref_arrays)
    for path in ref_arrays:
        assert _same_bits(arrays[path], ref_arrays[path]), path


def test_one_process_resumes_a_two_process_checkpoint(runs):
    _ok(runs, "half1")
    full2 = _ok(runs, "full2")
    half = runs["root"] / "half1"
    assert "resuming from" in runs["half1"][0].output()
    # 8 devices of one process reduce in another order than gloo over two processes
    for x, y in zip(_theta(half), _theta(full2.run_dir), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    assert len(_records(half)) == N


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sharding.num_processes=two", "'two'"),
        ("sharding.process_id=true", "'True'"),
    ],
)
def test_bad_process_settings_are_one_clear_line(override, message, capsys, tmp_path):
    from es_l2o.cli import train_main

    assert train_main([*TINY, f"run_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    key = override.partition("=")[0]
    assert len(err.splitlines()) == 1 and message in err and key in err
    assert "Integer" in err  # what would be valid
    assert not jax.distributed.is_initialized()
