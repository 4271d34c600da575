"""Bad input never crashes or corrupts: bad options give one clear line (exit 2),
crafted files never run code, and diverging tasks never make theta non-finite."""

import hashlib
import io
import json
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from diverging import ExplodingFamily

from es_l2o import checkpoint, export
from es_l2o.cli import eval_main, train_main
from es_l2o.es import PES, FullES
from es_l2o.lopt import MLPLOpt
from es_l2o.meta import load_snapshot, meta_train
from es_l2o.unroll import LOptTraining

TINY = [
    "population=quadratic",
    "num_iterations=2",
    "system.horizon=4",
    "es.population_size=4",
    "lopt.hidden_sizes=[4]",
    "progress=false",
]

# ------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["checkpoint_keep=0"], "checkpoint_keep must be an integer >= 1, got 0"),
        (["checkpoint_every=-5"], "checkpoint_every must be an integer >= 0, got -5"),
        (["checkpoint_every=2.5"], "Integer (key checkpoint_every)"),
        (["tensorboard=maybe"], "tensorboard must be true or false, got 'maybe'"),
        (["progress=3"], "progress must be true or false, got 3"),
        (["num_iterations=-1"], "num_iterations must be a positive integer, got -1"),
        (["es.std=-0.1"], "std must be > 0, got -0.1"),
        (["checkpoint_evry=5"], "checkpoint_evry"),
        (["population=nope"], "nope"),
        # the probes of issue 18
        (["es.population_size=-4"], "es.population_size must be a positive integer"),
        (["es.population_size=0"], "es.population_size must be a positive integer"),
        (["es.population_size=2.5"], "converted to Integer (key es.population_size)"),
        (["es.population_size=eight"], "'eight' of type 'str' could not be converted"),
        (["es.std=abc"], "converted to Float (key es.std)"),
        (["lopt=mlpp"], "Available options in 'lopt': deep_momentum, hierarchical"),
        (["system.horizn=3"], "Key 'horizn' not in 'SystemConfig'"),
        (
            ["system.horizon_draw=octaves"],
            "horizon_draw must be one of ('episodes', 'steps'), got 'octaves'",
        ),
        (["es=pes", "es.particle_chunk=2"], "not in 'TruncatedESConfig'"),
        (["--cfg", "jobx"], "invalid choice: 'jobx'"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(argv, message, tmp_path, capsys):
    assert train_main([*TINY, f"run_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("es-l2o-train: error:") and message in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("where", ["/proc/x", "file", "file/below"])
def test_an_unwritable_output_folder_is_one_line(where, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    folder = where if where.startswith("/") else tmp_path / where
    assert train_main([*TINY, f"run_dir={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"es-l2o-train: error: cannot use {folder}:"), err
    assert len(err.splitlines()) == 1


def test_eval_into_an_unwritable_folder_is_one_line(saved, capsys):
    assert eval_main([str(saved), "horizon=4", "output_dir=/proc/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("es-l2o-eval: error: cannot use /proc/x")
        and len(err.splitlines()) == 1
    )


def test_a_folder_held_by_a_live_run_is_refused(tmp_path, capsys):
    from es_l2o.run_folder import claim_run_dir, release

    claim = claim_run_dir(tmp_path, may_move=False)  # as a running run holds it
    try:
        assert train_main([*TINY, f"run_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"run_dir={tmp_path} is in use by another run (process" in err
        assert len(err.splitlines()) == 1
        # the default folder (none given) moves to a free neighbour instead
        other = claim_run_dir(tmp_path, may_move=True)
        assert other.path == tmp_path.with_name(f"{tmp_path.name}_2")
        release(other)
    finally:
        release(claim)
    assert not (tmp_path / "config.yaml").exists()


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_run_that_learned_nothing_says_so(tmp_path, capsys):
    argv = [*TINY, "num_iterations=1", "meta_validation.every=0", "lopt.step_mult=1e30"]
    argv.append("evaluation.learning_rates=[1e-3]")
    assert train_main([*argv, "evaluation.num_tasks=2", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the run learned nothing: inner steps diverged" in err, err
    assert "lopt.step_mult" in err and len(err.splitlines()) == 1
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["rows"]["learned"]["train_loss"] is None
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("delay", [0.0, 1.0, 2.0])
def test_sigterm_during_start_up_is_one_line(tmp_path, delay):
    """At any moment of the start-up (imports, Hydra, building the run; a signal
    that lands in a gc callback or an extension's start-up too), SIGTERM stops the
    run with one line and exit status 143."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "es_l2o.cli", *TINY, f"run_dir={tmp_path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until es-l2o-train catches SIGTERM
        caught = next(x for x in status.read_text().splitlines() if "SigCgt" in x)
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().startswith("es-l2o-train: stopped by SIGTERM"), err
    assert len(err.strip().splitlines()) == 1


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert train_main([f"resume={tmp_path}"]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("- just\n- a list\n")
    assert train_main([f"resume={tmp_path}"]) == 2
    assert "is not a mapping of settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------
# files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    lopt = MLPLOpt(hidden_sizes=(4,))
    folder = tmp_path_factory.mktemp("opt")
    export.save(folder / "opt.safetensors", lopt, lopt.init(jax.random.key(0)))
    header = {"format": export.FORMAT, "format_version": 1, "architecture": "mlp"}
    header.update(config=lopt.config(), metadata={})
    export.write_arrays(folder / "opt.eslo", lopt.init(jax.random.key(0)), header)
    return folder / "opt.safetensors"


def test_an_optimizer_file_of_another_architecture_is_refused(saved):
    with pytest.raises(export.OptimizerFileError, match="holds a 'mlp' optimizer"):
        export.load(saved, num_steps=10, architecture="lstm")
    with pytest.raises(export.OptimizerFileError, match="expected 'lstm'"):
        export.load_theta(saved, architecture="lstm")
    assert export.load(saved, num_steps=10, architecture="mlp") is not None


class _Payload:
    """Unpickling this would run `open(marker, "w")`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _forge(raw: bytes, **changes) -> bytes:
    """A file of the earlier es_l2o format (and checkpoint format) with its header
    changed and a checksum that matches again."""
    (length,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16 : 16 + length])
    payload = raw[16 + length :]
    header = {k: v for k, v in header.items() if k != "sha256"}
    header.update(changes)
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header["sha256"] = hashlib.sha256(canonical + payload).hexdigest()
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return raw[:8] + struct.pack("<Q", len(blob)) + blob + payload


def _forge_safetensors(raw: bytes, tensor_fields=None, **entries) -> bytes:
    """A safetensors optimizer file with metadata `entries` and every tensor's
    `tensor_fields` changed, and a checksum that matches again."""
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    header["__metadata__"].update(entries)
    for name in header:
        if name != "__metadata__":
            header[name].update(tensor_fields or {})
    tensors = safetensors.numpy.load(raw)
    header["__metadata__"]["sha256"] = export.digest(header["__metadata__"], tensors)
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _crafted_files(tmp_path, saved):
    """Files an attacker could hand out, each under a trusted-looking name."""
    marker = tmp_path / "pwned"
    files = {"pickle": pickle.dumps({"theta": _Payload(str(marker))})}
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    files["npy_object"] = buffer.getvalue()
    # well-formed files (valid checksums) that ask for unsafe things, in both formats
    code_config = {"_target_": "os.system", "hidden_sizes": "__import__('os')"}
    raw = saved.read_bytes()
    files["object_dtype"] = _forge_safetensors(raw, {"dtype": "O"})
    files["code_architecture"] = _forge_safetensors(raw, architecture="os.system")
    files["code_config"] = _forge_safetensors(raw, config=json.dumps(code_config))
    raw = saved.with_suffix(".eslo").read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    leaves = json.loads(raw[16 : 16 + length])["leaves"]
    files["legacy_object_dtype"] = _forge(
        raw, leaves=[dict(r, dtype="object") for r in leaves]
    )
    files["legacy_code_architecture"] = _forge(raw, architecture="os.system")
    files["legacy_code_config"] = _forge(raw, config=code_config)
    return marker, files


def test_crafted_files_are_refused_and_never_run_code(tmp_path, saved, capsys):
    marker, files = _crafted_files(tmp_path, saved)
    template = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
    for name, data in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(export.OptimizerFileError):
            export.load_theta(path)
        assert eval_main([str(path), "horizon=4"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("es-l2o-eval: error:") and len(err.splitlines()) == 1
        folder = tmp_path / name / "ckpt_00000001"
        (folder / "meta").mkdir(parents=True)  # the crafted bytes as its record
        (folder / "meta" / "metadata").write_bytes(data)
        checkpoint._seal(folder)  # a complete-looking checkpoint
        with pytest.raises(checkpoint.CheckpointError, match="damaged"):
            checkpoint.load(folder.parent, template)
    assert not marker.exists()


def test_forged_checkpoint_records_are_refused(tmp_path):
    path = checkpoint.save(tmp_path, {"k": jax.random.key(0)}, iteration=1)
    record_path = path / "meta" / "metadata"
    raw = record_path.read_text()
    template = jax.eval_shape(lambda: {"k": jax.random.key(0)})
    for changes, match in (
        ({"key_impls": {"['k']": "evil"}}, "holds PRNG keys"),
        ({"iteration": -4}, "bad iteration"),
        ({"format_version": 99}, "format version 99"),
        ({"format": "es_l2o.optimizer"}, "expected 'es_l2o.checkpoint'"),
        ({"leaves": "k"}, "no list of leaves"),
        ({"leaves": [["['k']", "uint32", [3]]]}, r"is uint32\[3\], expected"),
    ):
        record_path.write_text(json.dumps({**json.loads(raw), **changes}))
        checkpoint._seal(path)  # as a forger would
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(path, template)
    record_path.write_text(raw)
    with pytest.raises(checkpoint.CheckpointError, match="meta/metadata does not"):
        checkpoint.load(path, template)  # sealed with the last forgery
    checkpoint._seal(path)
    assert checkpoint.load(path, template).iteration == 1


# ------------------------------------------------------------------------------------
# diverging tasks


LOPT = MLPLOpt(hidden_sizes=(4,))


@pytest.mark.parametrize("kind", ["full_es", "pes"])
def test_diverging_tasks_keep_meta_training_with_a_finite_theta(kind, tmp_path):
    system = LOptTraining(ExplodingFamily(), LOPT, horizon=5, nonfinite_penalty=1e3)
    if kind == "full_es":
        es = FullES(system, population_size=8, std=0.1, optimizer=optax.sgd(1.0))
    else:
        es = PES(
            system,
            population_size=8,
            std=0.1,
            optimizer=optax.sgd(1.0),
            truncation_length=3,
        )
    theta0, key = LOPT.init(jax.random.key(1)), jax.random.key(2)
    result = meta_train(
        es,
        theta0,
        key=key,
        num_iterations=4,
        metrics_path=tmp_path / "metrics.jsonl",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=1,
        checkpoint_keep=4,
        progress=False,
    )
    assert len(result.history) == 4
    assert all(
        np.isfinite(r["meta_loss"]) and r["theta_finite"] for r in result.history
    )
    assert sum(r["nonfinite_steps"] for r in result.history) > 0  # resets counted
    if kind == "pes":
        assert sum(r["nonfinite_particles"] for r in result.history) > 0
    for path in checkpoint.checkpoints(tmp_path / "checkpoints"):
        snapshot = load_snapshot(path, es, theta0, key, validation=False)
        theta = es.theta(snapshot.state)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(theta))
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, result.theta, theta0))
    assert float(moved) > 0  # it kept learning, not frozen
    # resuming from the middle (every particle's inner state, the evosax and
    # meta-optimizer states, NaN loss scales and all) ends bitwise the same
    middle = load_snapshot(
        checkpoint.checkpoint_path(tmp_path / "checkpoints", 2),
        es,
        theta0,
        key,
        validation=False,
    )
    resumed = meta_train(
        es, theta0, key=key, num_iterations=4, resume=middle, progress=False
    )
    for a, b in zip(
        jax.tree.leaves(resumed.state), jax.tree.leaves(result.state), strict=True
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
