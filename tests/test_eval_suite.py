"""Suite evaluation: the baselines' sweeps, per-metric tuning, won fractions,
the weight-inflation flag and `es-l2o-eval OPTIMIZER_FILE suite=...`."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from es_l2o import evaluate as ev
from es_l2o.baselines import get_baseline
from populations import suites

LRS = (1e-2, 1e-1)
HORIZON = 10


def _tiny_suite():
    by_name = {e.name: e for e in suites.get_suite("default")}
    return [
        dataclasses.replace(by_name["quadratic_10d"], horizon=HORIZON),
        dataclasses.replace(by_name["rosenbrock_2d"], horizon=HORIZON, split="ood"),
    ]


@pytest.fixture(scope="module")
def result():
    # the "learned" optimizer is Adam at the grid's second rate, so its numbers
    # must equal the sweep's Adam numbers at that rate (same tasks, same data)
    return ev.evaluate_suite(
        lambda _: optax.adam(LRS[1]),
        _tiny_suite(),
        num_seeds=2,
        learning_rates=LRS,
        speedup_cap=2.0,
    )


def test_a_baseline_row_is_the_baseline_run_alone(result):
    # the suite's sweep of SGD at LRS[0], seed by seed, equals SGD run by itself on
    # the same held-out task with the same data order
    entry = _tiny_suite()[0]
    family = entry.eval_family()
    cfgs = family.enumerate(2)
    step_keys, metric_keys = ev._seed_keys(0, 2, 2 * HORIZON)
    losses = []
    for i in range(2):
        cfg = jax.tree.map(lambda x, i=i: x[i], cfgs)
        task, opt = family.task(cfg), get_baseline("sgd")(LRS[0])
        params = task.init(metric_keys[i])
        (params, _), _ = ev._run_scan(
            task, opt, (params, opt.init(params)), step_keys[i, :HORIZON]
        )
        losses.append(float(task.metrics(params, metric_keys[i])["train_loss"]))
    row = result["rows"][0]
    np.testing.assert_allclose(
        row["sgd"]["per_lr"]["train_loss"][0], np.mean(losses), rtol=1e-5
    )


def test_unknown_baseline_is_named():
    with pytest.raises(ValueError, match="'lbfgs'"):
        ev.evaluate_entry(
            lambda _: optax.sgd(0.1), _tiny_suite()[0], baselines=("adam", "lbfgs")
        )


def test_structure(result):
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["quadratic_10d", "rosenbrock_2d"]
    for row in rows:
        assert row["curves"]["learned"].__len__() == HORIZON
        assert len(row["curves"]["adam"]) == 2 * HORIZON  # run on to the cap
        assert len(row["curves"]["sgd"]) == HORIZON
        for name in ev.SUITE_BASELINES:
            assert len(row[name]["per_lr"]["train_loss"]) == len(LRS)
        assert 0 < row["speedup"]["value"] <= 2.0
        assert np.isfinite(row["learned"]["param_norm"])
    assert set(result["summary"]) == {"iid", "ood", "all"}


def test_learned_equals_sweep_at_same_rate(result):
    for row in result["rows"]:
        np.testing.assert_allclose(
            row["learned"]["train_loss"],
            row["adam"]["per_lr"]["train_loss"][1],
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            row["learned"]["param_norm"],
            row["adam"]["per_lr"]["param_norm"][1],
            rtol=1e-5,
        )
        # tuned Adam is at least as good, so the learned copy never wins
        assert row["win_train_loss_vs_adam"] is False


def test_best_rate_per_metric_is_brute_force_argmin(result):
    for row in result["rows"]:
        for name in ev.SUITE_BASELINES:
            b = row[name]
            train = np.nan_to_num(b["per_lr"]["train_loss"], nan=np.inf)
            assert b["best_lr_train"] == LRS[int(np.argmin(train))]
            # all rates diverged: the first rate's (non-finite) figure is reported
            np.testing.assert_equal(
                b["train_loss"], b["per_lr"]["train_loss"][int(np.argmin(train))]
            )
            np.testing.assert_equal(
                b["param_norm_train"], b["per_lr"]["param_norm"][int(np.argmin(train))]
            )


def test_won_fractions_match_rows(result):
    rows, summary = result["rows"], result["summary"]
    for split, s in summary.items():
        chosen = [r for r in rows if split == "all" or r["split"] == split]
        assert s["num_tasks"] == len(chosen)
        for ref in ("adam", "best"):
            best = [
                min(_finite(r[b]["train_loss"]) for b in ev.SUITE_BASELINES)
                if ref == "best"
                else r["adam"]["train_loss"]
                for r in chosen
            ]
            wins = [
                r["learned"]["train_loss"] < x - ev.WIN_MARGIN * abs(x)
                for r, x in zip(chosen, best, strict=True)
            ]
            assert s[f"won_train_loss_vs_{ref}"] == pytest.approx(np.mean(wins))
        speed = [r["speedup"]["value"] for r in chosen]
        assert s["median_speedup"] == pytest.approx(np.median(speed))


def _finite(x):
    return x if np.isfinite(x) else np.inf


def _row(learned_train, learned_val, learned_norm, adam_train=0.3, adam_val=1.0):
    return {
        "learned": {
            "train_loss": learned_train,
            "val_loss": learned_val,
            "param_norm": learned_norm,
        },
        "adam": {
            "train_loss": adam_train,
            "val_loss": adam_val,
            "param_norm_train": 10.0,
        },
    }


def test_weight_inflation_flag():
    assert ev.weight_inflation(_row(0.1, 2.0, 30.0))  # wins train, loses val, big
    assert not ev.weight_inflation(_row(0.1, 2.0, 12.0))  # norm not inflated
    assert not ev.weight_inflation(_row(0.1, 0.5, 30.0))  # wins validation too
    assert not ev.weight_inflation(_row(0.5, 2.0, 30.0))  # loses training
    assert not ev.weight_inflation(_row(0.1, None, 30.0))  # no validation split


def test_report_files(result, tmp_path):
    paths = ev.write_suite_report(result, tmp_path)
    loaded = json.loads((tmp_path / "suite.json").read_text())
    assert loaded["summary"]["all"]["num_tasks"] == 2
    md = (tmp_path / "suite.md").read_text()
    assert "quadratic_10d" in md and "median speedup" in md
    csv_lines = (tmp_path / "suite.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * (3 + 3 * len(ev.SUITE_BASELINES))
    assert set(paths) == {"md", "csv", "json"}


def test_eval_main_suite(monkeypatch, tmp_path, capsys):
    from es_l2o import cli, export
    from es_l2o.lopt import MLPLOpt

    lopt = MLPLOpt(hidden_sizes=(4,))
    path = tmp_path / "opt.safetensors"
    export.save(path, lopt, lopt.init(jax.random.key(0)))
    monkeypatch.setitem(suites.SUITES, "tiny", _tiny_suite()[:1])
    out = tmp_path / "report"
    argv = [str(path), "suite=tiny", "num_seeds=1", f"output_dir={out}"]
    argv.append("evaluation.learning_rates=[0.01,0.1]")
    assert cli.eval_main(argv) == 0
    for name in ("suite.md", "suite.csv", "suite.json", "loss_curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "suite.json").read_text())["settings"]["suite"] == "tiny"
    assert cli.eval_main([str(path), "suite=nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
