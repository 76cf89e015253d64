"""`llmpareto sensitivity RUN`: the table, --top, the heat-map and bad input, on hand-written
sensitivity.json files (no model needed)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from llmpareto.cli.sensitivity import (
    add_sensitivity_command,
    load_sensitivity,
    plot_sensitivity,
    sensitivity_table,
)
from llmpareto.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def profile(**over) -> dict:
    data = {
        "version": 1, "model_sha256": "abc", "text_sha256": "def",
        "space": "formats,sparsity", "tokens": 128,
        "reference": {"q_proj": "f16", "sparsity:q_proj": 0.0, "student:blocks": 30},
        "reference_kl_nats": 1.2e-06,
        "choices": {"q_proj": ["f16", "q8_0", "q4_0"], "sparsity:q_proj": [0.0, 0.5],
                    "student:blocks": [30, 27]},
        "delta_kl_nats": {"q_proj": [0.0, 0.0003, 0.02], "sparsity:q_proj": [-1e-7, None],
                          "student:blocks": [0.0, 0.4]},
        "seconds": 31.5, "evaluations": 120,
    }
    data.update(over)
    return data


def write_run(tmp_path: Path, data: dict | str) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (run / "sensitivity.json").write_text(text)
    return run


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmpareto")
    add_sensitivity_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_table_shape_values_and_missing_choices(tmp_path):
    table = sensitivity_table(load_sensitivity(write_run(tmp_path, profile())))
    assert list(table.index) == ["q_proj", "sparsity:q_proj", "student:blocks"]
    assert list(table.columns) == ["f16", "q8_0", "q4_0", "0.0", "0.5", "30", "27"]
    assert table.columns.name == "delta_kl_nats"
    assert table.loc["q_proj", "q8_0"] == pytest.approx(3e-4, rel=1e-9)
    assert table.loc["student:blocks", "27"] == pytest.approx(0.4, rel=1e-9)
    assert table.loc["sparsity:q_proj", "0.0"] == pytest.approx(-1e-7, rel=1e-9)
    assert math.isnan(table.loc["sparsity:q_proj", "0.5"])  # null: not measured
    assert math.isnan(table.loc["q_proj", "27"])  # not a choice of q_proj
    assert math.isnan(table.loc["student:blocks", "f16"])
    assert int(table.notna().sum().sum()) == 6


def test_top_orders_by_largest_maximum_delta(tmp_path, capsys):
    run = write_run(tmp_path, profile())
    assert run_cli(["sensitivity", str(run), "--top", "2", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "student:blocks" in out and "q_proj" in out
    assert "sparsity:q_proj" not in out  # its largest delta (-1e-7) is the smallest
    assert out.index("student:blocks") < out.index("\nq_proj")  # 0.4 nats before 0.02
    assert "heat-map:" not in out
    assert not (run / "sensitivity.png").exists()


def test_top_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--top 0"):
        run_cli(["sensitivity", str(write_run(tmp_path, profile())), "--top", "0"])


def test_plot_writes_a_png_atomically(tmp_path):
    out = plot_sensitivity(profile(), tmp_path / "heat.png")
    assert out == tmp_path / "heat.png"
    blob = out.read_bytes()
    assert len(blob) > 1000 and blob.startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temporary left behind


def test_plot_of_many_rows_stays_within_bounds(tmp_path):
    keys = [f"model.layers.{i // 7}.self_attn.{'qkvogud'[i % 7]}_proj" for i in range(211)]
    formats = ["f16", "q8_0", "q5_0", "q4_0", "tq2_0"]
    choices = {k: formats for k in keys}
    deltas = {k: [0.0, 1e-6 * (i + 1), 1e-4, 1e-2 if i % 3 else None, 1.0 + i]
              for i, k in enumerate(keys)}
    data = profile(choices=choices, delta_kl_nats=deltas, reference={k: "f16" for k in keys})
    from PIL import Image

    with Image.open(plot_sensitivity(data, tmp_path / "big.png")) as img:
        width, height = img.size
    assert 2000 <= height <= 4000  # 211 labelled rows, height capped at 40 in at 100 dpi
    assert width <= 3000


def test_command_prints_header_keys_and_heat_map(tmp_path, capsys):
    run = write_run(tmp_path, profile())
    assert run_cli(["sensitivity", str(run)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "128 calibration tokens" in header and "nats" in header
    assert "1.2e-06" in header and "120 evaluations" in header and "31.5 s" in header
    for key in ("q_proj", "sparsity:q_proj", "student:blocks"):
        assert key in out
    rows = {line.split()[0]: line for line in out.splitlines()[3:6]}
    assert rows["q_proj"].split()[1:] == ["0", "0.0003", "0.02"]  # not-a-choice cells blank
    assert rows["sparsity:q_proj"].split()[1:] == ["-1e-07", "n/a"]  # null: not measured
    assert rows["student:blocks"].split()[1:] == ["0", "0.4"]
    assert f"heat-map: {run / 'sensitivity.png'}" in out
    assert (run / "sensitivity.png").read_bytes().startswith(PNG_MAGIC)


def test_command_plot_path_and_sensitivity_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "kept.json"
    elsewhere.write_text(json.dumps(profile()))
    png = tmp_path / "custom.png"
    assert run_cli(["sensitivity", str(run), "--sensitivity", str(elsewhere),
                    "--plot", str(png)]) == 0
    assert f"heat-map: {png}" in capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_missing_run_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sensitivity(tmp_path / "nope")


def test_missing_file_says_which_searches_write_it(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"has no sensitivity\.json.*knapsack, evolve or auto"):
        load_sensitivity(tmp_path / "run")


def test_bad_json(tmp_path):
    with pytest.raises(UserError, match="not valid JSON"):
        load_sensitivity(write_run(tmp_path, '{"version": 1, "choices": {'))


def test_length_mismatch_names_the_key(tmp_path):
    bad = profile()
    bad["delta_kl_nats"]["sparsity:q_proj"] = [0.0]
    with pytest.raises(UserError, match=r"'sparsity:q_proj' has 2 choices but 1"):
        load_sensitivity(write_run(tmp_path, bad))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("choices"), "lacks the key.*choices"),
    (lambda d: d["delta_kl_nats"].pop("q_proj"), "'q_proj' is in choices but not in delta"),
    (lambda d: d["delta_kl_nats"].update(v_proj=[0.1]), "'v_proj' is in delta_kl_nats but"),
    (lambda d: d["delta_kl_nats"].update(q_proj=[0, "x", 1]), r"delta_kl_nats\['q_proj'\]"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(tokens="many"), "tokens must be a number"),
])
def test_malformed_profile(tmp_path, change, message):
    bad = profile()
    change(bad)
    with pytest.raises(UserError, match=message):
        load_sensitivity(write_run(tmp_path, bad))
