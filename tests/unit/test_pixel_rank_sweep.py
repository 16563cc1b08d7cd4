"""benchmarks/pixel_rank_sweep.py on tiny sizes: it trains, scores and summarises what it claims."""

from __future__ import annotations

import json

from benchmarks.pixel_rank_sweep import main, summarise, table


def _run(rank: int, seed: int, f1: float) -> dict:
    return {"pixel_rank": rank, "seed": seed, "n_pixel_channels": rank or 30, "pixel_cnn_parameters": 1,
            "macro_f1": f1, "accuracy": f1, "mass_inside_ratio": None, "mass_inside_model_over_prior": None,
            "topk_iou_ratio": None, "topk_iou_model_over_prior": None, "train_seconds": 1.0}


def test_within_noise_is_two_standard_errors_of_the_difference() -> None:
    runs = [_run(0, s, f) for s, f in enumerate((0.80, 0.82, 0.84))]
    runs += [_run(8, s, f) for s, f in enumerate((0.79, 0.81, 0.83))]  # 0.01 lower, same spread
    runs += [_run(4, s, f) for s, f in enumerate((0.50, 0.51, 0.52))]  # far lower
    summary = summarise(runs)
    assert list(summary) == ["4", "8", "0"]  # compressed ranks ascending, P as is last
    near, far = summary["8"]["vs_uncompressed"]["macro_f1"], summary["4"]["vs_uncompressed"]["macro_f1"]
    assert abs(near["difference"] + 0.01) < 1e-9 and near["within_noise"]
    assert not far["within_noise"]
    assert "mass_inside_ratio" not in summary["0"]  # no figure where no run had it
    text = table(summary)
    assert "0.510 ± 0.010 *" in text and "0.810 ± 0.020 |" in text and "n/a" in text


def test_sweep_trains_every_rank_and_seed_and_resumes(tmp_path) -> None:
    out = tmp_path / "sweep.json"
    args = ["--n-images", "60", "--image-size", "24", "--epochs", "1", "--cutoff-epoch", "1", "--ranks", "4,0",
            "--seeds", "0,1", "--out", str(out)]
    summary = main(args)
    written = json.loads(out.read_text())
    assert sorted((r["pixel_rank"], r["seed"]) for r in written["runs"]) == [(0, 0), (0, 1), (4, 0), (4, 1)]
    assert written["summary"] == summary and set(summary) == {"4", "0"}
    for run in written["runs"]:
        assert 0.0 <= run["macro_f1"] <= 1.0 and 0.0 <= run["accuracy"] <= 1.0
        assert run["mass_inside_ratio"] is not None and run["mass_inside_ratio"] > 0  # the test split has lesions
    assert summary["4"]["n_pixel_channels"] == 4 and summary["0"]["n_pixel_channels"] == 36 * 3
    assert summary["4"]["pixel_cnn_parameters"] < summary["0"]["pixel_cnn_parameters"]
    assert "macro_f1" in summary["4"]["vs_uncompressed"]

    before = written["runs"]
    main([*args, "--resume"])  # nothing left to train: the same runs come back
    assert json.loads(out.read_text())["runs"] == sorted(before, key=lambda r: (r["pixel_rank"], r["seed"]))
