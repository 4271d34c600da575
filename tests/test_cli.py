"""The command line: a tiny end-to-end run; one clear line (exit 2) per bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from es_l2o import export, files
from es_l2o.cli import eval_main, train_main

TINY = [
    "num_iterations=2",
    "system.horizon=4",
    "es.population_size=4",
    "lopt.hidden_sizes=[4]",
    "evaluation.num_tasks=2",
    "evaluation.learning_rates=[1e-3,1e-2]",
    "progress=false",
]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: its runs compile the
    same programs (the sweep's two jobs, the resumed run, the evaluation), which
    then compile once (about half the module's time on a 2-core CPU)."""
    import jax

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], -1)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-job sweep (`-m seed=0,1`) through the joblib launcher (one worker: in
    this process); job 1's folder holds what a run killed before its first
    checkpoint left there."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "1").mkdir()
    (folder / "1" / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 7}\n')
    argv = ["-m", *TINY, "seed=0,1", "hydra/launcher=joblib"]
    argv += ["hydra.launcher.n_jobs=1", f"hydra.sweep.dir={folder}"]
    assert train_main(argv) == 0
    return folder


@pytest.fixture(scope="module")
def tiny_run(sweep):
    return sweep / "0"


def test_a_sweep_writes_one_run_folder_per_job(sweep):
    assert (sweep / "multirun.yaml").is_file()
    for job, seed in (("0", 0), ("1", 1)):
        assert (
            export.load_theta(sweep / job / "optimizer.safetensors")[2]["seed"] == seed
        )
        assert (
            f"- seed={seed}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        )
    # the run started again in job 1's folder began with fresh metrics
    lines = (sweep / "1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1]


def test_tiny_run_writes_the_run_directory(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "theta.safetensors",
        "optimizer.safetensors",
        "summary.json",
    } <= names
    lines = [
        json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [x["iteration"] for x in lines] == [0, 1]
    assert all(x["wall_time_s"] > 0 and "meta_loss" in x for x in lines)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["rows"]) == {"learned", "adam_lr_0.001", "adam_best"}
    assert summary["best_lr"]["validation"] in (1e-3, 1e-2)
    assert {"train_loss", "val_loss", "val_accuracy", "param_norm"} <= set(
        summary["rows"]["learned"]
    )
    lopt, _, metadata = export.load_theta(tiny_run / "optimizer.safetensors")
    assert lopt.hidden_sizes == (4,) and metadata["horizon"] == 4
    assert "population_size: 4" in (tiny_run / "config.yaml").read_text()


def test_a_resumed_run_removes_the_temporary_files_of_killed_writes(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    left = [  # as kills during these writes leave them
        run_dir / ".theta.safetensors.tmp-k1ll3d.part",
        run_dir / ".config.yaml.tmp-k1ll3d.part",
        run_dir / ".tmp-k1ll3d.part",  # by the earlier writer
        run_dir / "checkpoints" / ".tmp-k1ll3d.part",
    ]
    for path in left:
        path.write_bytes(b"partial")
    cut_short = run_dir / "checkpoints" / "ckpt_00000003.orbax-checkpoint-tmp-99"
    (cut_short / "state").mkdir(parents=True)
    assert files.temp_files(run_dir) == sorted(left[:3])
    assert train_main([f"resume={run_dir}", "num_iterations=3"]) == 0
    assert not [p for p in [*left, cut_short] if p.exists()]
    assert not files.temp_files(run_dir) + files.temp_files(run_dir / "checkpoints")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1, 2]


def test_eval_reads_a_saved_optimizer(tiny_run, tmp_path, capsys):
    code = eval_main(  # the horizon and population the file records
        [
            str(tiny_run / "optimizer.safetensors"),
            "evaluation.num_tasks=2",
            "evaluation.learning_rates=[1e-3]",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "population=digits_mlp (recorded in" in out and "horizon=4 (recorded" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_steps"] == 4 and summary["num_tasks"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_option=1"], "no_such_option"),
        (["lopt=no_such_lopt"], "no_such_lopt"),
        (["es.population_size=5"], "population_size=5 is odd"),
        (["num_iterations=0"], "num_iterations must be a positive integer, got 0"),
        (["system.horizon=-3"], "horizon must be a positive integer"),
        (["es.algorithm=Nope"], "unknown evosax algorithm 'Nope'"),
        (
            ["meta_validation.every=-1"],
            "meta_validation.every must be an integer >= 0, got -1",
        ),
        (["meta_validation.meta_loss=best"], "meta_loss must be one of"),
    ],
)
def test_train_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    assert train_main([*TINY, f"run_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("es-l2o-train: error:") and message in err
    assert len(err.splitlines()) == 1


def test_eval_bad_files_are_one_clear_line(tiny_run, tmp_path, capsys):
    assert eval_main([str(tmp_path / "missing.safetensors")]) == 2
    assert "no optimizer file at" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((tiny_run / "optimizer.safetensors").read_bytes()[:-20])
    assert eval_main([str(broken)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert eval_main([str(tiny_run / "optimizer.safetensors"), "horizon=0"]) == 2
    assert "horizon must be a positive integer, got 0" in capsys.readouterr().err


def test_a_resume_checks_its_config_against_the_checkpoint(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("std: 0.01", "std: 0.5"))
    assert train_main([f"resume={run_dir}", "num_iterations=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its config.yaml differs from the settings its checkpoint" in err
    assert len(err.splitlines()) == 1


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "es_l2o.cli", "no_such_option=1", f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no_such_option" in proc.stderr
