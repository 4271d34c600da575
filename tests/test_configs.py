"""Every option of every config group composes (against the typed schemas) and
instantiates; every experiment composes and builds its whole run (population,
optimizer, unrolled systems, estimator) without training; the Hydra app prints
its help and composed config."""

import pytest

from es_l2o import cli

GROUPS = {
    group: sorted(p.stem for p in (cli.config_dir() / group).glob("*.yaml"))
    for group in ("lopt", "es", "population", "experiment")
}


def _options(group):
    return [(group, option) for option in GROUPS[group]]


@pytest.mark.parametrize(
    ("group", "option"),
    [*_options("lopt"), *_options("es"), *_options("population")],
)
def test_every_group_option_composes_and_instantiates(group, option):
    cfg = cli.compose("config", [f"{group}={option}"])
    built = cli.instantiate(cfg[group])
    if group == "es":  # a partial estimator: the system comes at run time
        assert built.func.__name__ == cfg.es._target_.rsplit(".", 1)[1]
        assert built.keywords["nonfinite_penalty"] == cfg.system.nonfinite_penalty
    else:
        assert type(built).__name__ == cfg[group]._target_.rsplit(".", 1)[1]


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_experiment_builds_its_run(experiment):
    """The run an experiment describes, built up to its first iteration (training
    one compiles for minutes on a 2-core CPU for the generalist; the tiny runs of
    tests/test_cli.py and test_bad_input.py train the same code)."""
    cfg = cli.compose("config", [f"experiment={experiment}"])
    settings = cli._train_settings(cfg)
    family, lopt = cli.instantiate(cfg.population), cli.instantiate(cfg.lopt)
    systems = cli._systems(cfg, family, lopt)
    estimator = cli._estimator(cfg, family, systems)
    assert settings.num_iterations == cfg.num_iterations
    assert estimator is not None and len(systems) >= 1


def test_the_truncated_estimators_share_one_base():
    from omegaconf import OmegaConf

    configs = {
        o: OmegaConf.to_container(cli.compose("config", [f"es={o}"]).es)
        for o in ("pes", "tes", "nres")
    }
    targets = {o: c.pop("_target_") for o, c in configs.items()}
    assert len(set(targets.values())) == 3
    assert configs["pes"] == configs["tes"] == configs["nres"]


def test_help_lists_the_config_groups(capsys):
    assert cli.train_main(["--help"]) == 0
    out = capsys.readouterr().out
    for group, options in GROUPS.items():
        assert f"{group}: {', '.join(options)}" in out
    assert "es-l2o-train -m" in out


def test_cfg_job_prints_the_composed_config(capsys):
    assert cli.train_main(["--cfg", "job", "es=pes", "es.std=0.05"]) == 0
    out = capsys.readouterr().out
    assert "_target_: es_l2o.es.PES" in out and "std: 0.05" in out
    assert cli.eval_main(["--cfg", "job", "horizon=7"]) == 0
    assert "horizon: 7" in capsys.readouterr().out


def test_a_failed_sweep_job_is_one_line_naming_its_overrides(capsys, tmp_path):
    argv = ["-m", "es.population_size=-4,0", f"hydra.sweep.dir={tmp_path}"]
    assert cli.train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "es-l2o-train: error: job es.population_size=-4: "
        "es.population_size must be a positive integer, got -4"
    ]
    assert not any(tmp_path.glob("*/config.yaml"))  # a refused job leaves no run
