"""python -m ddpm_lightning.tools.recipe_study on a tiny budget: two variants (today's recipe and
v-prediction with a zero terminal SNR) trained for 12 s each, scored with the three samplers,
post-hoc EMA on the better one, the report and its figures; a second call reuses everything."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ddpm_lightning.tools import recipe_study

from helpers import TINY


def test_max_time_format():
    assert recipe_study.max_time(20) == "00:00:20:00"
    assert recipe_study.max_time(0.2) == "00:00:00:12"
    assert recipe_study.max_time(90.5) == "00:01:30:30"


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tmp_path, weights, monkeypatch):
    monkeypatch.setenv("DDPM_FID_CACHE", str(tmp_path / "stats"))
    out = tmp_path / "study"
    tiny = [o for o in TINY if not o.startswith("logger=")]
    argv = [str(out), *tiny, "callbacks.eval.num_samples=6", "callbacks.eval.batch_size=6",
            "callbacks.eval.reference.max_images=16", "callbacks.eval.nll_images=8",
            "callbacks.eval.nll_timesteps=4", "callbacks.eval.kid_subset_size=3",
            "callbacks.eval.jackknife_groups=0", "module.posthoc.every_n_steps=5",
            "--experiment", "cpu_embedded", "--minutes", "0.2", "--variants", "today", "v_zt",
            "--n", "6", "--nfe", "4", "6", "--eval-every", "5", "--posthoc", "0.1",
            "--posthoc-nfe", "4",
            f"--nfe-args=--batch-size 6 --ref-max-images 16 --grid 3 --weights-path {weights}"]
    assert recipe_study.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    floor = summary.pop("real_floor")  # 6 real training images against the same reference
    assert 0 < floor < min(e["fid"]["mean"] for v in summary.values()
                           for e in v["entries"].values())
    assert {"today", "v_zt"} <= set(summary)
    posthoc = [v for v in summary if "posthoc" in v]
    assert len(posthoc) == 1 and posthoc[0].endswith("σ_rel=0.1")
    for variant, s in summary.items():
        nfes = (4,) if "posthoc" in variant else (4, 6)  # --posthoc-nfe 4
        assert set(s["entries"]) == {f"{k}@{n}" for k in ("dpm_sde", "ddim0", "dpm_ode")
                                     for n in nfes}, variant
        for e in s["entries"].values():
            assert e["fid"]["mean"] > 0 and 0 <= e["speckle"]["mean"] <= 1
    for run in ("today_s0", "v_zt_s0"):
        config = (out / "runs" / run / "config.yaml").read_text()
        assert "max_time: 00:00:00:12" in config and "ema: posthoc" in config
    assert "parameterization: v" in (out / "runs" / "v_zt_s0" / "config.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "| today | 1 | " in report and "| v_zt | 1 | " in report
    assert [line.count("| – ") for line in report.splitlines()
            if line.startswith(f"| {posthoc[0]} |")] == [4, 3]  # no steps; @6 unscored
    for variant in ("today", "v_zt"):  # the optimizer steps reached in the budget
        assert len(summary[variant]["steps"]) == 1 and summary[variant]["steps"][0] > 0
    for name in ("fid_vs_time.png", "grids.png"):
        assert Image.open(out / name).width > 100
    # a second call trains and samples nothing again
    monkeypatch.setattr(recipe_study.subprocess, "run", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr("ddpm_lightning.core.generate.generate",
                        lambda *a, **k: pytest.fail("sampled again"))
    monkeypatch.setattr("ddpm_lightning.tools.posthoc_ema.main",
                        lambda *a, **k: pytest.fail("solved the post-hoc EMA again"))
    assert recipe_study.main([*argv, "--archive", str(tmp_path / "kept")]) == 0
    assert not list((tmp_path / "kept").rglob("*.ckpt"))
    # the copy without checkpoints is a study too: pointed at it, nothing is trained or sampled
    assert recipe_study.main([str(tmp_path / "kept"), *argv[1:]]) == 0
    assert (json.loads((tmp_path / "kept" / "summary.json").read_text())
            == json.loads((out / "summary.json").read_text()))


def _scored_run(run, n=6, nfes=(4,), drop=()):
    """A run folder as ``archive`` keeps it: no checkpoint, its nfe results."""
    entries = {f"{s}@{f}": {"fid": 50.0 + i, "speckle": 0.1, "n": n}
               for f in nfes for i, s in enumerate(recipe_study.SAMPLERS)}
    for key in drop:
        del entries[key]
    meta = {"n": n, "seed": 0, "ref_split": "test", "ref_max_images": None, "bf16": False,
            "global_step": 123}
    (run / "nfe").mkdir(parents=True)
    (run / "nfe" / "results.json").write_text(json.dumps({"meta": meta, "entries": entries}))
    (run / recipe_study.DONE).write_text("{}")


def test_an_archived_run_is_reused_only_for_what_it_holds(tmp_path):
    run = tmp_path / "today_s0"
    _scored_run(run)
    entries, step = recipe_study.archived(run, 6, [4], [])
    assert step == 123 and entries["ddim0@4"]["fid"] == 51.0
    with pytest.raises(ValueError, match="ddim0@8, dpm_ode@8"):
        recipe_study.archived(run, 6, [4, 8], [])  # cannot be scored again without the weights
    with pytest.raises(ValueError, match="n=6, not 10"):
        recipe_study.archived(run, 10, [4], [])
    with pytest.raises(ValueError, match="seed=0, not 1"):
        recipe_study.archived(run, 6, [4], ["--seed", "1"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert recipe_study.archived(run, 6, [4], []) is None  # with its weights: score() decides
    assert recipe_study.archived(tmp_path / "new_s0", 6, [4], []) is None


def test_archive_keeps_results_and_drops_weights(tmp_path):
    out, dest = tmp_path / "study", tmp_path / "kept"
    run = out / "runs" / "today_s0"
    _scored_run(run)
    (run / "nfe" / "rows").mkdir()
    (run / "nfe" / "rows" / "ddim0@4.png").write_bytes(b"png")
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("step,eval/fid\n5,80\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run / "posthoc_ema").mkdir()
    (run / "posthoc_ema" / "snap.pt").write_bytes(b"weights")
    unfinished = out / "runs" / "v_s0"  # no study_done.json: stopped mid-training
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("x: 1\n")
    (out / "summary.json").write_text("{}")
    (out / "report.md").write_text("# r\n")
    recipe_study.archive(out, dest)
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == ["report.md", "runs/today_s0/csv/metrics.csv", "runs/today_s0/nfe/results.json",
                    "runs/today_s0/nfe/rows/ddim0@4.png", "runs/today_s0/study_done.json",
                    "summary.json"]
    assert recipe_study.archived(dest / "runs" / "today_s0", 6, [4], [])[1] == 123


def test_a_finished_run_trained_with_other_settings_is_not_reused(tmp_path):
    """Variants pin their switches; a run folder whose config contradicts one is refused in one
    line (the recipe's defaults may have changed since it was trained)."""
    run = tmp_path / "today_s0"
    run.mkdir()
    (run / "config.yaml").write_text(
        "module: {parameterization: v, loss_weight: none, compile: false}\n"
        "schedule: {rescale_zero_terminal_snr: false}\ntrainer: {precision: 32-true}\n"
        "model: {ch: 32}\n")
    recipe_study.check_settings(run, recipe_study.VARIANTS["v"] + ["model=unet_cpu32"])
    with pytest.raises(ValueError, match="module.parameterization=v, not eps"):
        recipe_study.check_settings(run, recipe_study.VARIANTS["today"])
    with pytest.raises(ValueError, match="trainer.precision=32-true, not bf16-mixed"):
        recipe_study.check_settings(run, [*recipe_study.VARIANTS["v"][:3], "trainer.precision=bf16-mixed"])
    with pytest.raises(ValueError, match=r"trainer.max_time=<absent>, not 00:00:20:00"):
        recipe_study.check_settings(run, ["++trainer.max_time=00:00:20:00"])


def test_a_runs_own_command_passes_its_check(tmp_path):
    """The config a run's command composes to passes ``check_settings`` with that command: an
    override of a study default (the post-hoc snapshot interval) is what the run trains with
    (it once came before the study's default and lost, so the run was refused when reused)."""
    from omegaconf import OmegaConf

    from helpers import compose

    command = recipe_study.run_overrides(
        "cpu_embedded", [*recipe_study.VARIANTS["v_zt"], "module.posthoc.every_n_steps=5"],
        seed=1, minutes=0.5, eval_every=40)
    cfg = compose("train", *command)
    assert cfg.module.posthoc.every_n_steps == 5 and cfg.seed == 1
    assert cfg.callbacks.eval.every_n_steps == 40 and cfg.trainer.max_time == "00:00:00:30"
    run = tmp_path / "v_zt_s1"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / recipe_study.DONE).write_text(json.dumps({"command": command}))
    recipe_study.check_settings(run, command)
    other = recipe_study.run_overrides("fashion_mnist_cpu", recipe_study.VARIANTS["v_zt"],
                                       seed=1, minutes=0.5, eval_every=40)
    with pytest.raises(ValueError, match="experiment=cpu_embedded, not fashion_mnist_cpu"):
        recipe_study.check_settings(run, other)
    longer = recipe_study.run_overrides(
        "cpu_embedded", [*recipe_study.VARIANTS["v_zt"], "module.posthoc.every_n_steps=5"],
        seed=1, minutes=1, eval_every=40)
    with pytest.raises(ValueError, match="max_time=00:00:00:30, not 00:00:01:00"):
        recipe_study.check_settings(run, longer)


@pytest.mark.parametrize("override, flag", [("seed=3", "--seeds"),
                                            ("++trainer.max_time=00:01:00:00", "--minutes"),
                                            ("callbacks.eval.every_n_steps=9", "--eval-every")])
def test_an_override_of_what_the_study_sets_is_refused(override, flag):
    with pytest.raises(ValueError, match=f"sets .* itself \\(use {flag}\\)"):
        recipe_study.run_overrides("cpu_embedded", [override], 0, 1, 10)


def test_the_grids_wrap_into_a_row_per_variant(tmp_path):
    """``side_by_side(..., columns=2)``: the study's grids.png puts a variant per row (DDIM, ODE)
    instead of one strip of 2 × variants images; without ``columns`` all stay in one row."""
    import numpy as np
    from PIL import Image

    from ddpm_lightning.tools.report import side_by_side

    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 0, 255)}
    widths = {"a": 300, "b": 200, "c": 200, "d": 200}  # a column is as wide as its widest
    grids = {}
    for label, colour in colours.items():
        grids[label] = tmp_path / f"{label}.png"
        Image.new("RGB", (widths[label], 40), colour).save(grids[label])

    def boxes(path):  # (left, top) of each colour's block
        px = np.asarray(Image.open(path).convert("RGB"))
        out = {}
        for label, colour in colours.items():
            ys, xs = np.nonzero((px == colour).all(-1))
            assert len(ys) == widths[label] * 40, label  # each image whole, none overlapping
            out[label] = (xs.min(), ys.min())
        return out

    side_by_side(grids, tmp_path / "row.png")
    row = boxes(tmp_path / "row.png")
    assert len({top for _, top in row.values()}) == 1
    assert row["a"][0] < row["b"][0] < row["c"][0] < row["d"][0]
    side_by_side(grids, tmp_path / "wrapped.png", columns=2)
    wrapped = boxes(tmp_path / "wrapped.png")
    assert wrapped["a"][0] == wrapped["c"][0] < wrapped["b"][0] == wrapped["d"][0]
    assert wrapped["a"][1] == wrapped["b"][1] < wrapped["c"][1] - 40 == wrapped["d"][1] - 40
