"""Tests for the data side: datasets, DiffusionDataModule and conf/data/*.yaml (CPU, fast)."""

from __future__ import annotations

import gc
import gzip
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.core.pixels import to_model_range, to_uint8
from ddpm_lightning.training import datasets as ds
from ddpm_lightning.training.data import DiffusionDataModule, random_hflip

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
FMNIST = Path(ds.FASHION_MNIST_DEBIAN)
HAVE_FMNIST = (FMNIST / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"{FMNIST} absent: apt-get install -y dataset-fashion-mnist",
)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    """Write an IDX file (gzipped if the name ends in .gz)."""
    dtype = {0x08: ">u1", 0x0B: ">i2"}[code]
    payload = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload += array.astype(dtype).tobytes()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def first_batch(dm: DiffusionDataModule, train: bool = True) -> torch.Tensor:
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return next(iter(loader))


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Ten PNG/JPG images of various sizes and modes, some in a subfolder."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (20, 50), (64, 64), (17, 23), (100, 40)]
    for i in range(10):
        w, h = sizes[i % len(sizes)]
        mode = ["RGB", "L", "RGBA"][i % 3]
        array = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        img = Image.fromarray(array, "RGBA").convert(mode)
        folder = tmp_path / ("sub" if i % 2 else "")
        folder.mkdir(exist_ok=True)
        ext = "jpg" if mode == "RGB" and i % 2 else "png"
        img.save(folder / f"img{i}.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


# --------------------------------------------------------------------------- scaling


def test_scaling_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), pixels)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255], dtype=torch.uint8)
    )


# --------------------------------------------------------------------------- embedded


def test_embedded_loads_and_scales():
    dm = DiffusionDataModule(batch_size=16)
    assert dm.train_set is None  # construction loads nothing
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4500, 500)
    batch = first_batch(dm)
    assert batch.shape == (16, 1, 32, 32) and batch.dtype == torch.uint8
    assert batch[..., :2, :].max() == 0 and batch[..., :, -2:].max() == 0  # 2 px padding of 0
    x = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and x.shape == batch.shape
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0
    assert first_batch(dm, train=False).shape == (16, 1, 32, 32)


def test_embedded_split_and_order_are_seeded():
    def make(seed):
        dm = DiffusionDataModule(batch_size=32, seed=seed)
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert torch.equal(first_batch(a), first_batch(b))
    assert not torch.equal(a.val_set.images, c.val_set.images)
    assert not torch.equal(first_batch(a), first_batch(c))
    # The file is sorted by class: the hold-out must not be one block of it.
    raw = ds.fit_size(ds.load_embedded(), 32)
    assert not torch.equal(a.val_set.images, raw[-500:])
    assert not torch.equal(a.val_set.images, raw[:500])


def test_workers_give_the_same_order():
    dm0 = DiffusionDataModule(batch_size=64, num_workers=0, seed=3)
    dm2 = DiffusionDataModule(batch_size=64, num_workers=2, seed=3)
    dm0.setup()
    dm2.setup()
    loader = dm2.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory
    assert torch.equal(first_batch(dm0), next(iter(loader)))
    del loader, dm2  # shut the persistent workers down now, not in a later test
    gc.collect()


@pytest.mark.parametrize("rank", [0, 1])
def test_device_loader_gives_the_dataloader_batches(rank):
    """The GPU path's loader (here on the CPU) against the DataLoader, with one sampler
    setting: the same batches in each of two epochs of rank ``rank`` of 2, and after a resume
    in the middle of epoch 1."""
    from ddpm_lightning.training.loaders import (
        DeviceLoader,
        EpochRandomSampler,
        ResumableDataLoader,
    )

    dm = DiffusionDataModule(batch_size=16, seed=5)
    dm.setup()
    data = dm.train_set
    loaders = []
    for kind in ("dataloader", "device"):
        sampler = EpochRandomSampler(data, seed=5, num_replicas=2, rank=rank)
        loaders.append(ResumableDataLoader(data, sampler=sampler, batch_size=16, drop_last=True,
                                           collate_fn=ds.collate_images) if kind == "dataloader"
                       else DeviceLoader(data.images, sampler, 16, "cpu"))
    ref, dev = loaders
    assert len(ref) == len(dev) == len(data) // 2 // 16
    for epoch in (0, 1):
        ref.sampler.set_epoch(epoch)
        dev.sampler.set_epoch(epoch)
        a, b = list(ref), list(dev)
        assert len(a) == len(b) == len(ref)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    first_of_epoch_1 = a[0]
    state = {**ref.state_dict(), "epoch": 1, "consumed": 7}
    ref.load_state_dict(state)
    dev.load_state_dict(state)
    a, b = list(ref), list(dev)
    assert len(a) == len(b) == len(ref) - 7 and not torch.equal(b[0], first_of_epoch_1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert dev.state_dict()["consumed"] == 7  # counted by the datamodule, not the iterator


def test_resize_and_channel_conversion():
    dm = DiffusionDataModule(image_size=16, channels=3, convert_channels=True, batch_size=8)
    dm.setup()
    batch = first_batch(dm)
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])


# --------------------------------------------------------------------------- MNIST family


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    write_idx(tmp_path / "a.idx", array, code=0x0B)
    write_idx(tmp_path / "b.idx.gz", array, code=0x0B)
    for name in ("a.idx", "b.idx.gz"):
        out = ds.read_idx(tmp_path / name)
        assert out.shape == (3, 4) and np.array_equal(out, array)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        ds.read_idx(tmp_path / "bad.idx")


def test_mnist_from_torchvision_layout(tmp_path, no_network):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    dm = DiffusionDataModule("mnist", root=str(tmp_path), image_size=28, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (40, 10)
    assert first_batch(dm).shape == (8, 1, 28, 28)


@needs_fmnist
def test_fashion_mnist_from_debian_folder(no_network):
    dm = DiffusionDataModule("fashion_mnist", root=str(FMNIST), batch_size=128)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (60000, 10000)
    batch = first_batch(dm)
    assert batch.shape == (128, 1, 32, 32) and batch.dtype == torch.uint8
    labels = ds.read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and np.array_equal(np.bincount(labels), [6000] * 10)


# --------------------------------------------------------------------------- folder


def test_folder_dataset(image_folder):
    dm = DiffusionDataModule(
        "folder", root=str(image_folder), image_size=16, channels=3, batch_size=4, val_fraction=0.2
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2)
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert all(t.shape == (3, 16, 16) and t.dtype == torch.uint8 for t in items)
    assert first_batch(dm).shape == (4, 3, 16, 16)
    grey = DiffusionDataModule(
        "folder", root=str(image_folder), image_size=8, channels=1, batch_size=2
    )
    grey.setup()
    assert grey.train_set[0].shape == (1, 8, 8)


def test_folder_center_crop(tmp_path):
    # 60x20: white in the middle (columns 12..47), black on both sides; the
    # 10x10 center crop of the 30x10 resize lies inside the white part.
    array = np.zeros((20, 60), dtype=np.uint8)
    array[:, 12:48] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    Image.fromarray(array.T.copy()).save(tmp_path / "tall.png")
    dataset = ds.ImageFolderDataset.from_root(tmp_path, image_size=10, channels=1)
    for i in range(2):
        assert dataset[i].shape == (1, 10, 10) and dataset[i].min() >= 250


# --------------------------------------------------------------------------- flip


def test_random_flip_follows_the_global_seed_and_is_training_only():
    """Flips draw from the global RNG (seeded by seed_everything, restored on resume)."""
    batch = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)
    batch[:, :, :, 0] = 255  # a bright left column: flipped images have it on the right

    def flipped(dm, seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        out = dm.on_after_batch_transfer(batch.clone(), 0)
        return out[:, 0, 0, -1] == 1.0

    mask = flipped(DiffusionDataModule(random_flip=True), seed=5)
    assert 0 < mask.sum() < 64  # some flipped, some not
    assert torch.equal(mask, flipped(DiffusionDataModule(random_flip=True), seed=5))
    assert not torch.equal(mask, flipped(DiffusionDataModule(random_flip=True), seed=6))
    assert not flipped(DiffusionDataModule(random_flip=False)).any()
    evaluating = DiffusionDataModule(random_flip=True)
    evaluating.trainer = SimpleNamespace(training=False, global_rank=0)
    assert not flipped(evaluating).any()
    x = torch.randn(64, 3, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored) and 0 < mirrored.sum() < 64


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"dataset": "imagenet"}, ValueError, r"data\.dataset='imagenet'"),
        ({"dataset": "folder"}, ValueError, r"data\.root=None"),
        ({"channels": 3}, ValueError, r"data\.channels=3 .*'embedded'.*convert_channels"),
        (
            {"dataset": "cifar10", "root": "x", "channels": 1},
            ValueError,
            r"data\.channels=1 .*'cifar10'",
        ),
        ({"channels": 2}, ValueError, r"data\.channels=2"),
        ({"image_size": 0}, ValueError, r"data\.image_size=0"),
        ({"batch_size": -1}, ValueError, r"data\.batch_size=-1"),
        ({"val_fraction": 1.0}, ValueError, r"data\.val_fraction=1\.0"),
        ({"on_device": "gpu"}, ValueError, r"data\.on_device='gpu' is invalid"),
        ({"dataset": "folder", "root": "x", "on_device": True}, ValueError,
         r"data\.on_device=true needs an in-memory dataset"),
    ],
)
def test_config_errors_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        DiffusionDataModule(**kwargs)


def test_setup_errors(tmp_path, no_network):
    missing = tmp_path / "missing"
    cases = [
        ({"dataset": "folder", "root": str(missing)}, FileNotFoundError, r"data\.root='.*missing'"),
        ({"dataset": "folder", "root": str(tmp_path)}, ValueError, r"data\.root='.*'.*no images"),
        (
            {"dataset": "mnist", "root": str(missing)},
            FileNotFoundError,
            r"data\.root='.*missing'.*data\.download=true",
        ),
        (
            {"dataset": "fashion_mnist", "root": str(missing)},
            FileNotFoundError,
            r"data\.root='.*missing'.*dataset-fashion-mnist",
        ),
        ({"batch_size": 10_000}, ValueError, r"data\.batch_size=10000"),
    ]
    for kwargs, error, pattern in cases:
        dm = DiffusionDataModule(**kwargs)
        with pytest.raises(error, match=pattern):
            dm.setup("fit")


def test_cifar10_missing_root_never_downloads(tmp_path, no_network):
    root = tmp_path / "cifar"
    dm = DiffusionDataModule("cifar10", root=str(root), channels=3, download=False)
    dm.prepare_data()  # a no-op when download=false
    with pytest.raises(FileNotFoundError, match=r"data\.root='.*cifar'.*data\.download=true"):
        dm.setup("fit")
    assert not root.exists()


def test_dataloader_before_setup_errors():
    with pytest.raises(RuntimeError, match="setup"):
        DiffusionDataModule().train_dataloader()


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_instantiates(path, tmp_path, monkeypatch, image_folder):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "nowhere"))
    cfg = OmegaConf.load(path)
    assert cfg._target_ == "ddpm_lightning.training.data.DiffusionDataModule"
    if OmegaConf.is_missing(cfg, "root"):
        cfg.root = str(image_folder)
        cfg.batch_size = 4
        cfg.num_workers = 0
    dm = instantiate(cfg)
    assert isinstance(dm, DiffusionDataModule) and dm.train_set is None
    available = (
        dm.dataset == "embedded"
        or (dm.dataset == "folder" and dm.root == str(image_folder))
        or (dm.dataset == "fashion_mnist" and HAVE_FMNIST)
    )
    if not available:
        return  # the data is not here: constructing the module is what is checked
    dm.setup()
    batch = first_batch(dm)
    assert batch.dtype == torch.uint8
    assert batch.shape == (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)


def test_default_config_values():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "embedded.yaml")
    assert (cfg.dataset, cfg.image_size, cfg.channels, cfg.batch_size, cfg.random_flip) == (
        "embedded",
        16,
        1,
        64,
        False,
    )
    cifar = OmegaConf.load(CONF_DIR / "cifar10.yaml")
    assert (
        cifar.image_size,
        cifar.channels,
        cifar.batch_size,
        cifar.random_flip,
        cifar.download,
    ) == (32, 3, 128, True, False)
    for name in ("celebahq256", "lsun_church256"):
        big = OmegaConf.load(CONF_DIR / f"{name}.yaml")
        assert (big.dataset, big.image_size, big.channels, big.batch_size, big.random_flip) == (
            "folder",
            256,
            3,
            32,
            True,
        )


# --------------------------------------------------------------------------- Lightning


def test_lightning_fit_uses_the_hook_and_distributed_sampler_fits():
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(("train", batch.dtype, batch.min().item(), batch.max().item()))
            return self.layer(batch.mean().view(1, 1)).sum()

        def validation_step(self, batch, batch_idx):
            self.seen.append(("val", batch.dtype, batch.min().item(), batch.max().item()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = DiffusionDataModule(batch_size=16, random_flip=True)
    model = Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    stages = {s for s, *_ in model.seen}
    assert stages == {"train", "val"}
    assert all(dtype == torch.float32 and -1 <= lo < hi <= 1 for _, dtype, lo, hi in model.seen)

    # What Lightning does to the train loader under DDP: swap in a DistributedSampler.
    loader = dm.train_dataloader()
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(
            loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0
        )
        new = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert new.batch_size == 16 and new.collate_fn is loader.collate_fn
        shards.append(torch.cat(list(new)))
    assert shards[0].shape == shards[1].shape == (2240, 1, 32, 32)


def test_the_run_seed_sets_the_data_order_but_not_the_split():
    """seed=1 (a seed sweep's second job) shuffles the training images differently, and holds
    out the same images, so that evaluations compare on the same data."""
    import ddpm_lightning.app  # noqa: F401  (config resolvers)

    from helpers import compose

    cfg = compose("train", "seed=3")
    assert (cfg.data.seed, cfg.data.shuffle_seed) == (0, 3)
    batches, held_out = [], []
    for shuffle_seed in (0, 1):
        dm = DiffusionDataModule("embedded", image_size=16, batch_size=8,
                                 shuffle_seed=shuffle_seed)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
        held_out.append(dm.val_set.images)
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(held_out[0], held_out[1])
    default = DiffusionDataModule("embedded", image_size=16, batch_size=8)
    default.setup("fit")
    assert torch.equal(next(iter(default.train_dataloader())), batches[0])  # None: seed
