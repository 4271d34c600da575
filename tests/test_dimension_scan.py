"""analysis.dimension_scan: an exported optimizer on diagonal quadratics by size."""

import csv

import pytest

from analysis import dimension_scan
from es_l2o import pretrained


def test_scan_reports_each_task_and_writes_its_tables(tmp_path, capsys):
    path = str(pretrained.path("generalist"))
    out = tmp_path / "scan"
    dimension_scan.main(
        [path, "--dims", "10,30", "--tasks", "2", "--steps", "5", "--out", str(out)]
    )
    with open(out / "dimension_scan.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dim"], r["task"]) for r in rows] == [
        ("10", "0"),
        ("10", "1"),
        ("30", "0"),
        ("30", "1"),
    ]
    assert all(r["descended"] == "True" for r in rows)  # 5 steps of a sane optimizer
    assert "| 30 | 1 |" in (out / "dimension_scan.md").read_text()
    assert "| dim |" in capsys.readouterr().out


@pytest.mark.parametrize("dims", ["10,big", "10,1", ""])
def test_bad_dims_are_refused_with_one_line(capsys, dims):
    with pytest.raises(SystemExit) as stop:
        dimension_scan.main(["x.safetensors", "--dims", dims])
    assert stop.value.code == 2
    assert f"--dims {dims!r}" in capsys.readouterr().err
