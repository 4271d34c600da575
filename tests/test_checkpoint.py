"""Meta-training survives: checkpoints round-trip the whole state, a killed or stopped
run resumes bitwise where an uninterrupted one ends, signals stop it cleanly, and
TensorBoard event files are valid."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c
from xla_flags import with_devices

from es_l2o import checkpoint, export, files
from es_l2o.cli import train_main
from es_l2o.meta import (
    Interrupted,
    NonFiniteThetaError,
    ResumeError,
    Snapshot,
    load_snapshot,
    meta_train,
    truncate_lines,
)
from es_l2o.summaries import ScalarWriter

# ------------------------------------------------------------------------------------
# the checkpoint file


class _Fields(NamedTuple):  # not in sorted order: restored as a dict, it flattens
    zeta: jax.Array  # in another order
    alpha: jax.Array


def _tree():
    return {
        "w": jnp.arange(6.0).reshape(2, 3),
        "count": jnp.int32(7),
        "flags": jnp.array([True, False]),
        "key": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(4, impl="rbg"), 2),
        "nested": (jnp.ones(2, jnp.bfloat16), {"u": jnp.uint32(5)}),
        # zero-size leaves (an unrotated quadratic's rotation), which Orbax refuses
        "empty": _Fields(zeta=jnp.zeros((0,)), alpha=jnp.zeros((2, 0), jnp.int32)),
    }


def _bits(tree):
    """Leaves as raw bytes (typed keys as their key data)."""
    return [
        np.asarray(jax.random.key_data(x) if checkpoint._is_key(x) else x).tobytes()
        for x in jax.tree.leaves(tree)
    ]


def test_round_trip_keeps_every_leaf_and_typed_keys(tmp_path):
    tree = _tree()
    path = checkpoint.save(
        tmp_path, tree, iteration=12, metrics_position=11, metadata={"a": 1}
    )
    loaded = checkpoint.load(tmp_path, jax.eval_shape(lambda: tree))
    assert (loaded.iteration, loaded.metrics_position) == (12, 11)
    assert loaded.metadata == {"a": 1} and loaded.path == path
    assert jax.tree.structure(loaded.tree) == jax.tree.structure(tree)
    assert _bits(loaded.tree) == _bits(tree)
    assert loaded.tree["keys"].dtype == tree["keys"].dtype  # rbg stays rbg
    _, stored = checkpoint.arrays(path)  # without a template: the shapes as saved
    assert stored["['empty']['zeta']"].shape == (0,)
    assert stored["['empty']['alpha']"].shape == (2, 0)
    assert stored["['w']"].shape == (2, 3)
    np.testing.assert_array_equal(  # the key still draws the same numbers
        jax.random.normal(loaded.tree["key"], (3,)),
        jax.random.normal(tree["key"], (3,)),
    )


def test_keeps_the_last_k_and_cleans_temporary_files(tmp_path):
    (tmp_path / ".tmp-left-by-a-kill.part").write_bytes(b"partial")
    cut_short = tmp_path / "ckpt_00000009.orbax-checkpoint-tmp-1234567"
    (cut_short / "state").mkdir(parents=True)  # as a kill during a save leaves it
    (tmp_path / "ckpt_00000002" / "state").mkdir(parents=True)  # renamed, unsealed
    assert checkpoint.checkpoints(tmp_path) == []
    for i in range(1, 6):
        checkpoint.save(tmp_path, {"x": jnp.float32(i)}, iteration=i, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_00000004",
        "ckpt_00000005",
    ]
    assert checkpoint.checkpoints(tmp_path) == [
        checkpoint.checkpoint_path(tmp_path, i) for i in (4, 5)
    ]
    loaded = checkpoint.load(tmp_path, {"x": jax.ShapeDtypeStruct((), jnp.float32)})
    assert loaded.iteration == 5 and float(loaded.tree["x"]) == 5.0


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, r"x'\] is float32\[2\]"),
        ({"x": jax.ShapeDtypeStruct((2,), jnp.int32)}, "expected int32"),
        ({"y": jax.ShapeDtypeStruct((2,), jnp.float32)}, "missing"),
        ({"x": jax.eval_shape(lambda: jax.random.split(jax.random.key(0)))}, "PRNG"),
    ],
)
def test_a_checkpoint_of_another_structure_is_refused(tmp_path, template, match):
    checkpoint.save(tmp_path, {"x": jnp.zeros(2)}, iteration=1)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(tmp_path, template)


def _data_files(path):
    return [f for f in sorted(Path(path).rglob("*")) if f.parent.name == "d"]


def _record(path):
    return Path(path) / "meta" / "metadata"


@pytest.mark.parametrize(
    "damage", ["flip", "cut", "record", "checksum", "gone", "unsealed"]
)
def test_missing_and_damaged_checkpoints_are_refused(tmp_path, damage):
    template = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path, template)
    path = checkpoint.save(tmp_path, {"x": jnp.arange(4.0)}, iteration=3)
    assert _data_files(path)
    for f in _data_files(path):
        raw = f.read_bytes()
        if damage == "flip":
            f.write_bytes(raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:])
        elif damage == "cut":
            f.write_bytes(raw[: len(raw) // 2])
    if damage == "record":
        _record(path).write_text(_record(path).read_text()[:-9])
    elif damage == "checksum":
        record = json.loads(_record(path).read_text())
        _record(path).write_text(json.dumps({**record, "sha256": "0" * 64}))
        checkpoint._seal(path)  # as a forger would: the arrays' checksum must catch it
    elif damage == "gone":
        shutil.rmtree(path / "state")
    elif damage == "unsealed":
        (path / checkpoint.SEAL).unlink()
        assert checkpoint.latest(tmp_path) is None
    with pytest.raises(
        checkpoint.CheckpointError, match="damaged|corrupted|incomplete"
    ) as err:
        checkpoint.load(path, template)
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)
    if damage == "checksum":
        assert "checksum does not match" in str(err.value)


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    template = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    other = tmp_path / "opt.eslo"
    export.write_arrays(other, {"not": jnp.zeros(1)}, {"format": export.FORMAT})
    (tmp_path / "ckpt_00000001").write_bytes(other.read_bytes())
    for path in (other, tmp_path / "ckpt_00000001"):
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint folder"):
            checkpoint.load(path, template)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path, template)


def test_truncate_lines_cuts_after_the_checkpoint_position(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": 2}\n{"i": 3, "partial')
    assert truncate_lines(path, 2) == 2
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n'
    with pytest.warns(UserWarning, match="holds 2 complete lines"):
        assert truncate_lines(path, 5) == 2


# ------------------------------------------------------------------------------------
# the trainer: resume, signals, non-finite theta (a cheap stand-in estimator)


class _Walk:
    """A stand-in estimator: theta takes random steps from a key carried in the
    state and from the iteration key (both must be restored for a bitwise resume)."""

    algorithm = None

    def __init__(self, on_step=None, break_at=None):
        self.on_step, self.break_at = on_step, break_at
        self._step = jax.jit(self._pure_step)

    def init(self, key, theta):
        return {"theta": theta, "key": key, "count": jnp.zeros((), jnp.int32)}

    def theta(self, state):
        return state["theta"]

    def _pure_step(self, key, state):
        carried, sub = jax.random.split(state["key"])
        theta = jax.tree.map(
            lambda t: (
                t
                + 0.1 * jax.random.normal(sub, t.shape)
                + 0.01 * jax.random.normal(key, t.shape)
            ),
            state["theta"],
        )
        count = state["count"] + 1
        if self.break_at is not None:
            theta = jax.tree.map(
                lambda t: jnp.where(count == self.break_at, jnp.nan, t), theta
            )
        flat = jnp.concatenate([jnp.ravel(t) for t in jax.tree.leaves(theta)])
        metrics = {
            "meta_loss": jnp.sum(flat**2),
            "theta_finite": jnp.all(jnp.isfinite(flat)),
        }
        return {"theta": theta, "key": carried, "count": count}, metrics

    def step(self, key, state):
        out = self._step(key, state)
        if self.on_step is not None:
            self.on_step(int(out[0]["count"]))
        return out


THETA0 = {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}


def _loss(theta):  # a deterministic "meta-validation" loss
    return float(jnp.sum((theta["a"] - 0.3) ** 2) + jnp.sum(theta["b"] ** 2))


def _train(tmp, estimator, num_iterations=9, **kwargs):
    kwargs.setdefault("validate", _loss)
    kwargs.setdefault("validate_every", 2)
    return meta_train(
        estimator,
        THETA0,
        key=jax.random.key(0),
        num_iterations=num_iterations,
        metrics_path=tmp / "metrics.jsonl",
        checkpoint_dir=tmp / "checkpoints",
        checkpoint_every=2,
        progress=False,
        **kwargs,
    )


def _records(path):
    lines = [json.loads(x) for x in Path(path).read_text().splitlines()]
    for line in lines:
        line.pop("wall_time_s")
    return lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return tmp, _train(tmp, _Walk())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_iteration_checkpoints_and_resume_is_exact(
    tmp_path, reference, signum
):
    ref_dir, ref = reference

    def send(count):
        if count == 3:
            os.kill(os.getpid(), signum)

    previous = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stopped:
        _train(tmp_path, _Walk(on_step=send))
    assert signal.getsignal(signum) is previous  # handlers restored
    assert stopped.value.iteration == 3 and stopped.value.signum == signum
    assert stopped.value.checkpoint == checkpoint.checkpoint_path(
        tmp_path / "checkpoints", 3
    )
    assert len(_records(tmp_path / "metrics.jsonl")) == 3
    # a line written after the checkpoint (as by a kill) is dropped on resume
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "wall_time_s": 0, "stale": 1}\n{"partial')
    result = _train(tmp_path, _Walk(), resume=tmp_path / "checkpoints")
    assert [r["iteration"] for r in result.history] == list(range(3, 9))
    assert _bits(result.state) == _bits(ref.state)
    assert _bits(result.best_theta) == _bits(ref.best_theta)
    assert (result.best_iteration, result.best_validation_loss) == (
        ref.best_iteration,
        ref.best_validation_loss,
    )
    assert _records(tmp_path / "metrics.jsonl") == _records(ref_dir / "metrics.jsonl")


def test_a_finished_run_resumes_for_more_iterations(tmp_path, reference):
    ref_dir = reference[0]
    shutil.copytree(ref_dir, tmp_path / "more")
    longer = _train(
        tmp_path / "more", _Walk(), 12, resume=tmp_path / "more/checkpoints"
    )
    assert [r["iteration"] for r in longer.history] == [9, 10, 11]
    direct = _train(tmp_path, _Walk(), 12)
    assert _bits(longer.state) == _bits(direct.state)
    assert checkpoint.iteration_of(longer.checkpoint) == 12


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    def twice(count):
        if count == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    # the handler the run found (Python's default, or "ignore" in a background job)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, _Walk(on_step=twice))
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint.latest(tmp_path / "checkpoints") is None


def test_resume_refuses_another_seed_structure_or_length(tmp_path, reference):
    ref_dir = reference[0]
    walk = _Walk()
    with pytest.raises(ResumeError, match="another key"):
        load_snapshot(
            ref_dir / "checkpoints", walk, THETA0, jax.random.key(1), validation=True
        )
    with pytest.raises(checkpoint.CheckpointError, match="unexpected"):
        load_snapshot(
            ref_dir / "checkpoints",
            walk,
            {"a": jnp.zeros(3)},
            jax.random.key(0),
            validation=True,
        )
    with pytest.raises(ResumeError, match="beyond num_iterations=4"):
        _train(tmp_path, walk, num_iterations=4, resume=ref_dir / "checkpoints")
    bad = Snapshot(walk.init(jax.random.key(0), {"a": jnp.zeros(2)}), None, 1, 1)
    with pytest.raises(ResumeError, match="does not match"):
        _train(tmp_path, walk, resume=bad)
    (tmp_path / "full").mkdir()
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "full" / "checkpoints")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _train(tmp_path / "full", walk)


def test_a_non_finite_theta_stops_the_run_before_it_is_saved(tmp_path):
    with pytest.raises(NonFiniteThetaError, match="non-finite at iteration 4"):
        _train(tmp_path, _Walk(break_at=5), validate=None)
    for path in checkpoint.checkpoints(tmp_path / "checkpoints"):
        header, arrays = checkpoint.arrays(path)
        assert header["iteration"] <= 4
        assert all(
            np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f"
        )


# ------------------------------------------------------------------------------------
# TensorBoard event files


def _read_events(path):
    """An event file's [(step, {tag: value}, session_start, file_version)]: TFRecord
    framing checked with tensorboardX's CRC, events parsed by its protobuf classes."""
    data, at, events = Path(path).read_bytes(), 0, []
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack_from("<I", data, at + 8)
        body = data[at + 12 : at + 12 + length]
        (body_crc,) = struct.unpack_from("<I", data, at + 12 + length)
        assert (length_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body))
        event = event_pb2.Event.FromString(body)
        events.append(
            (
                event.step,
                {v.tag: v.simple_value for v in event.summary.value},
                event.session_log.status == event_pb2.SessionLog.START,
                event.file_version or None,
            )
        )
        at += 16 + length
    return events


def test_event_files_decode_and_a_resumed_writer_marks_its_restart(tmp_path):
    with ScalarWriter(tmp_path) as writer:
        writer.scalars(0, {"meta_loss": 2.5, "theta_finite": 1, "note": "skipped"})
        writer.scalars(1, {"meta_loss": float("nan")})
    with ScalarWriter(tmp_path / "b", purge_step=7) as writer:
        writer.scalars(7, {"meta_loss": -1.0})
    first = _read_events(next(tmp_path.glob("events.out.tfevents.*")))
    assert first[0][3] == "brain.Event:2"
    assert first[1][:3] == (0, {"meta_loss": 2.5, "theta_finite": 1.0}, False)
    assert first[2][0] == 1 and np.isnan(first[2][1]["meta_loss"])
    second = _read_events(next((tmp_path / "b").glob("events.out.tfevents.*")))
    assert [e[:3] for e in second[1:]] == [
        (7, {}, True),
        (7, {"meta_loss": -1.0}, False),
    ]


def test_events_flushed_before_a_kill_are_in_the_file(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from es_l2o.summaries import ScalarWriter\n"
        "writer = ScalarWriter(sys.argv[1])\n"
        "for step in range(20):\n"
        "    writer.scalars(step, {f'tag{i}': step for i in range(8)})\n"
        "    writer.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    events = _read_events(next(tmp_path.glob("events.out.tfevents.*")))
    assert [e[0] for e in events[1:]] == list(range(20))
    assert all(len(e[1]) == 8 for e in events[1:])


# ------------------------------------------------------------------------------------
# the command line, in subprocesses: SIGKILL, SIGTERM and SIGINT mid-run

TINY = [
    "population=quadratic",
    "system.horizon=4",
    "es.population_size=4",
    "lopt.hidden_sizes=[4]",
    "evaluation.num_tasks=2",
    "evaluation.learning_rates=[1e-3]",
    "meta_validation.every=0",
    "progress=false",
]
N = 60  # iterations; victims checkpoint every one, so they are killed early on


class _Proc:
    def __init__(self, run_dir, args, env):
        self.run_dir = Path(run_dir)
        self.log = self.run_dir.with_suffix(".log")
        self.err = self.run_dir.with_suffix(".err")
        with open(self.log, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "es_l2o.cli", *args],
                stdout=out,
                stderr=err,
                env=env,
            )

    def wait(self, timeout=300.0):
        code = self.popen.wait(timeout)
        return code, self.err.read_text()


def _newest_iteration(run_dir):
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    return None if path is None else int(path.name[5:13])


def _lines(path):
    return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ref: an uninterrupted run; once it has compiled its step (into a shared
    compilation cache), kill / term / int start and are sent SIGKILL / SIGTERM /
    SIGINT after their first checkpoint; kill is then resumed."""
    root = tmp_path_factory.mktemp("cli_runs")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    base = [*TINY, f"num_iterations={N}"]
    ref = _Proc(root / "ref", [*base, f"run_dir={root / 'ref'}"], env)
    deadline = time.monotonic() + 300
    while _lines(root / "ref" / "metrics.jsonl") == 0:  # its step is compiled
        assert ref.popen.poll() is None, ref.err.read_text()[-2000:]
        assert time.monotonic() < deadline, "the reference run never started"
        time.sleep(0.05)
    victims = {
        "kill": (signal.SIGKILL, ["checkpoint_keep=2", "tensorboard=true"]),
        "term": (signal.SIGTERM, []),
        "int": (signal.SIGINT, []),
    }
    procs = {
        name: _Proc(
            root / name,
            [*base, "checkpoint_every=1", *extra, f"run_dir={root / name}"],
            env,
        )
        for name, (_, extra) in victims.items()
    }
    out = {"root": root}
    pending, deadline = dict(procs), time.monotonic() + 300
    while pending:  # signal each one as soon as its first checkpoint exists
        for name, proc in list(pending.items()):
            if checkpoint.checkpoints(proc.run_dir / "checkpoints"):
                proc.popen.send_signal(victims[name][0])
                del pending[name]
            else:
                assert proc.popen.poll() is None, proc.err.read_text()[-2000:]
        assert time.monotonic() < deadline, f"no checkpoint from {sorted(pending)}"
        time.sleep(0.005)
    for name, proc in procs.items():
        out[name] = proc.wait()
        out[f"{name}_at"] = _newest_iteration(proc.run_dir)
        out[f"{name}_lines"] = _lines(proc.run_dir / "metrics.jsonl")
    resumed = _Proc(root / "kill_resume", [f"resume={root / 'kill'}"], env)
    out["ref"] = ref.wait()
    out["kill_resume"] = resumed.wait()
    return out


def _final_state(run_dir):
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    header, arrays = checkpoint.arrays(path)
    return header["iteration"], arrays


def _assert_same_run(run_dir, ref_dir):
    (it, arrays), (ref_it, ref_arrays) = _final_state(run_dir), _final_state(ref_dir)
    assert it == ref_it == N
    assert sorted(arrays) == sorted(ref_arrays)
    for name, array in arrays.items():  # the whole state, RNG keys included
        assert np.array_equal(array, ref_arrays[name]), name
    _, theta, _ = export.load_theta(run_dir / "optimizer.safetensors")
    _, ref_theta, _ = export.load_theta(ref_dir / "optimizer.safetensors")
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(ref_theta), strict=True):
        assert np.array_equal(a, b)
    assert _records(run_dir / "metrics.jsonl") == _records(ref_dir / "metrics.jsonl")


def test_sigkill_then_resume_ends_bitwise_where_an_uninterrupted_run_ends(runs):
    root = runs["root"]
    assert runs["ref"][0] == 0, runs["ref"][1][-2000:]
    assert runs["kill"][0] == -signal.SIGKILL
    assert 1 <= runs["kill_at"] < N  # killed mid-run, after a checkpoint
    assert runs["kill_lines"] >= runs["kill_at"]
    assert runs["kill_resume"][0] == 0, runs["kill_resume"][1][-2000:]
    assert len(checkpoint.checkpoints(root / "kill" / "checkpoints")) == 2  # keep=2
    assert not files.temp_files(root / "kill")  # nor one a killed write left
    _assert_same_run(root / "kill", root / "ref")


@pytest.mark.parametrize(("name", "signum"), [("term", 15), ("int", 2)])
def test_sigterm_and_sigint_checkpoint_and_print_how_to_resume(runs, name, signum):
    code, err = runs[name]
    run_dir = runs["root"] / name
    assert code == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    assert f"es-l2o-train resume={run_dir}" in err
    assert signal.Signals(signum).name in err
    at = runs[f"{name}_at"]
    assert 1 <= at < N
    assert runs[f"{name}_lines"] == at  # stopped cleanly after the checkpoint
    assert not (run_dir / "optimizer.safetensors").exists()


def test_tensorboard_events_of_a_killed_and_resumed_run(runs):
    files = sorted((runs["root"] / "kill" / "tensorboard").glob("events.out.*"))
    assert len(files) == 2
    events = [_read_events(f) for f in files]
    resumed, killed = sorted(events, key=lambda e: not any(x[2] for x in e))
    start = runs["kill_at"]
    assert resumed[1][:3] == (start, {}, True)  # SessionLog.START at the checkpoint
    steps = [e[0] for e in resumed[2:]]
    assert steps == list(range(start, N))
    assert {e[0] for e in killed[1:]} >= set(range(start))
    assert all("meta_loss" in e[1] for e in resumed[2:])


# -- bad resumes, on copies of these runs --------------------------------------------


def _copy(runs, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(runs["root"] / name, target)
    return target


def _refused(argv, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("es-l2o-train: error:") and len(err.splitlines()) == 1
    return err


def test_resume_with_another_config_is_refused(runs, tmp_path, capsys):
    run_dir = _copy(runs, "ref", tmp_path)
    err = _refused([f"resume={run_dir}", "es.std=0.5", "seed=3"], capsys)
    assert "cannot change es.std (the run has 0.01, given 0.5); seed" in err
    assert "only num_iterations" in err
    err = _refused([f"resume={run_dir}", "lopt=lstm"], capsys)
    assert "cannot change lopt" in err
    err = _refused([f"resume={run_dir}", "num_iterations=5"], capsys)
    assert "beyond num_iterations=5" in err
    err = _refused([f"resume={tmp_path / 'nowhere'}"], capsys)
    assert "no config.yaml there" in err
    err = _refused([*TINY, f"run_dir={run_dir}"], capsys)
    assert f"continue it with resume={run_dir}" in err


def test_resume_from_a_corrupted_checkpoint_is_refused(runs, tmp_path, capsys):
    run_dir = _copy(runs, "kill", tmp_path)
    older, newest = checkpoint.checkpoints(run_dir / "checkpoints")
    record = json.loads(_record(newest).read_text())
    _record(newest).write_text(json.dumps({**record, "sha256": "0" * 64}))
    err = _refused([f"resume={run_dir}"], capsys)
    assert "corrupted" in err and newest.name in err
    assert f"previous checkpoint {older.name}" in err
    shutil.rmtree(newest)
    shutil.rmtree(run_dir / "checkpoints")
    err = _refused([f"resume={run_dir}"], capsys)
    assert "no checkpoint in" in err


# ------------------------------------------------------------------------------------
# a one-process run over several devices resumes onto its mesh

MESH_RESUME = """
import jax, tempfile
from es_l2o.es import PES
from es_l2o.lopt import MLPLOpt
from es_l2o.meta import load_snapshot, meta_train
from es_l2o.sharding import population_mesh
from es_l2o.unroll import LOptTraining
from populations.quadratic import QuadraticFamily

assert jax.device_count() == 8
lopt = MLPLOpt(hidden_sizes=(4,))
system = LOptTraining(QuadraticFamily(), lopt, horizon=(4, 8), stagger=True)
es = PES(system, population_size=8, truncation_length=2, mesh=population_mesh())
theta, key, folder = lopt.init(jax.random.key(1)), jax.random.key(0), tempfile.mkdtemp()
run = meta_train(es, theta, key=key, num_iterations=1, checkpoint_dir=folder,
                 progress=False)
state = load_snapshot(folder, es, theta, key, validation=False).state
pairs = list(zip(jax.tree.leaves(run.state), jax.tree.leaves(state), strict=True))
moved = [i for i, (a, b) in enumerate(pairs)
         if not a.sharding.is_equivalent_to(b.sharding, a.ndim)]
assert not moved, moved
assert len(state.inner.step.sharding.device_set) == 8
print("on the mesh:", len(pairs))
"""


def test_a_multi_device_state_is_restored_onto_its_mesh():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=with_devices(8)["XLA_FLAGS"],
        PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", MESH_RESUME],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # every leaf of the state compared (the child asserts none moved)
    assert int(done.stdout.split("on the mesh:")[1]) > 10, done.stdout
