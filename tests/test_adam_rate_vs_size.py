"""analysis.adam_rate_vs_size: tuned Adam's rate per family, with its model size."""

import jax
import pytest

from analysis import adam_rate_vs_size
from es_l2o.evaluate import ADAM_LEARNING_RATES
from populations.quadratic import QuadraticFamily


def test_row_counts_parameters_and_picks_the_lowest_mean():
    keys = jax.random.split(jax.random.key(0), 2)
    row = adam_rate_vs_size.family_row(QuadraticFamily(dim=6), 20, keys)
    assert row["params"] == 6 and row["metric"] == "train_loss"
    best = ADAM_LEARNING_RATES[row["means"].index(min(row["means"]))]
    assert row["best_lr"] == pytest.approx(best)
    # 20 steps of a 6-d quadratic: the largest rates get furthest
    assert row["best_lr"] >= 0.01
    table = adam_rate_vs_size.markdown([row], 20, 2)
    assert f"| quadratic | 6 | train_loss | {row['best_lr']:.3g} |" in table


def test_unknown_population_is_one_line_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as stop:
        adam_rate_vs_size.main(["--population", "nope"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--population 'nope'" in err and "generalist" in err
