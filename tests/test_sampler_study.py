"""tools/sampler_study.py end to end on a checkpoint of the embedded digits (500 held-out
images: the speckle threshold once indexed 1,000 of them and stopped with an IndexError)."""

import json

from helpers import run_script


def test_sampler_study_runs_on_the_embedded_digits(tiny_ckpt, tmp_path):
    proc = run_script("tools/sampler_study.py", str(tiny_ckpt), "--n", "2", "--nfe", "2",
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "results.json").read_text()).values()
    assert row["tv_threshold"] > 0 and row["speckled"]
    assert all(k.endswith("@ 2") and 0 <= v <= 1 for k, v in row["speckled"].items())
    assert (tmp_path / f"step{row['step']:05d}_nfe2.png").is_file()
    # the default recipe predicts v with ᾱ_T = 0: at t = T the ε̂ its v̂ gives is x_T = ε exactly
    # (the network's raw output, read as ε̂, is not)
    first = row["eps"][0]
    assert first["t"] == 49 and first["rmse"] < 1e-5, row["eps"]
