"""`hermes demo` wiring on a miniature cohort (the real demo's quality is measured in docs/training.md)."""

from __future__ import annotations

import math

import pytest

from hermes.cli import main


@pytest.mark.slow
def test_demo_pipeline_runs_and_resumes(tmp_path, capsys) -> None:
    from hermes.cli.demo import run_demo

    overrides = {
        "steps": 2,
        "data": {"patch_size": [32, 32, 32], "num_workers": 0, "val_fraction": 0.0},
        "validation": {"every_steps": 100},
    }
    kwargs = {"scale": 0.5, "cases": 2, "test_cases": 1, "datasets": ["LiverCT", "BrainT1"], "progress": False}
    result = run_demo(tmp_path / "demo", train_overrides=overrides, **kwargs)
    assert set(result.summary["datasets"]) == {"LiverCT", "BrainT1"}
    assert 0.0 <= result.mean_dice <= 1.0 and not math.isnan(result.mean_dice)
    for name in ("catalog.yaml", "train.yaml", "run/model/spec.json", "evaluation/summary.json", "evaluation/report.html"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "LiverCT (mean)" in result.table
    assert set(result.seconds) == {"cohort", "prepare", "train", "evaluate"}
    # the report shows the masks: best and worst case per dataset, as PNG files it links to
    html = result.report.read_text()
    assert len(result.overlays) == 2  # best and worst case per dataset; here one test case each
    for png in result.overlays:
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"href='overlays/{png.name}'" in html
    assert {p.name.split("__")[0] for p in result.overlays} == {"LiverCT", "BrainT1"}
    printed = capsys.readouterr().out  # what was generated: datasets, cases, modalities, labels
    assert f"segmentation overlay (image | reference | prediction): {result.overlays[0]}" in printed
    assert "Dataset102_LiverCT" in printed and "liver_tumour" in printed and "2 datasets, 6 cases" in printed
    # a second run reuses the cohort and cache and resumes the finished training
    again = run_demo(tmp_path / "demo", train_overrides=overrides, **kwargs)
    assert again.summary["overall"] == result.summary["overall"]


def test_demo_cli_is_registered(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--out" in capsys.readouterr().out


def test_demo_datasets_flag_passes_through(monkeypatch, tmp_path) -> None:
    from pathlib import Path

    import hermes.cli.demo as demo
    from hermes.cli import build_parser

    args = build_parser("demo").parse_args(["demo", "--out", str(tmp_path), "--datasets", "108", "BrainT1", "--steps", "3"])
    assert args.datasets == ["108", "BrainT1"] and args.steps == 3
    assert build_parser("demo").parse_args(["demo"]).datasets is None  # the default cohort
    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs, out=out)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        demo.run(args)
    assert seen["datasets"] == ["108", "BrainT1"] and seen["train_overrides"] == {"steps": 3}
    assert Path(seen["out"]) == tmp_path
