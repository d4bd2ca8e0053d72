"""LightningDataModule for DDPM training, plus the pixel-range helpers.

Loaders yield ``uint8`` image batches ``[B, C, H, W]`` (no labels). The
conversion to the model range ``[-1, 1]`` and the optional random horizontal
flip run on the device in :meth:`DiffusionDataModule.on_after_batch_transfer`,
so the CPU side only indexes a tensor (or decodes a file, for ``folder``).

Note: Lightning uses the datamodule's ``on_after_batch_transfer`` only when the
model is fitted with ``datamodule=...``; if the LightningModule also overrides
that hook, the datamodule's version still wins (Lightning warns).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ddpm_lightning.core.pixels import to_model_range
from ddpm_lightning.training import datasets as ds
from ddpm_lightning.training.loaders import (
    DeviceLoader,
    EpochRandomSampler,
    ResumableDataLoader,
    seed_worker,
)


def random_hflip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of a ``[B, C, H, W]`` batch left-right with probability 1/2.

    The mask is drawn on the images' device (from ``generator``, which must live there, or
    from that device's global RNG): a mask drawn on the CPU and copied to a GPU would cost a
    host-to-device copy, and a sync, at every training step.
    """
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class DiffusionDataModule(LightningDataModule):
    """Images for DDPM: one of ``embedded`` (default, offline), ``mnist``,
    ``fashion_mnist``, ``cifar10``, ``folder`` or ``synthetic`` (CIFAR-10-shaped random
    pixels, 50k/10k, for throughput checks; converted to ``channels``/``image_size``).

    Args:
        dataset: dataset name (see above).
        root: data folder; ignored by ``embedded``. ``fashion_mnist`` also reads the
            gzipped IDX files of the Debian package ``dataset-fashion-mnist``
            (``/usr/share/datasets/fashion-mnist``) directly.
        image_size: side of the square images given to the model.
        channels: 1 or 3. Must match the data (1 for MNIST-like, 3 for CIFAR-10)
            unless ``convert_channels`` is true; folder images are always converted.
        batch_size: batch size **per device** (under DDP the global batch is
            ``batch_size * world_size``).
        num_workers: DataLoader workers (persistent when > 0).
        random_flip: random horizontal flip of training batches (on the device).
        seed: seeds the train/val split (and, unless ``shuffle_seed`` is given, the shuffle).
        shuffle_seed: seeds the shuffle order and the workers (None: ``seed``). The shuffle is
            a function of (shuffle_seed, epoch), dealt out over ranks under DDP, and the
            loader's position in the epoch is kept in checkpoints (see
            ``ResumableDataLoader``). The configs set it to the run's ``seed``, so that the
            jobs of a seed sweep differ in their data order too, while the split, and so the
            evaluation images, stay the same.
        val_fraction: fraction of ``embedded``/``folder`` held out for val/test
            (seeded). 0 means no hold-out: val/test then use the training images.
            ``mnist``/``fashion_mnist``/``cifar10`` always use their test split.
        download: let torchvision download ``mnist``/``fashion_mnist``/``cifar10``
            into ``root``; when false nothing is ever downloaded.
        convert_channels: allow grey->RGB (repeat) or RGB->grey (luma) for fixed datasets.
        on_device: hold the training set on the training device and take batches by index
            (``DeviceLoader``: no workers, no copies; the same batches as the DataLoader).
            "auto": on a CUDA device for the in-memory datasets (all but ``folder``); true:
            always (in-memory datasets only); false: never.
    """

    def __init__(
        self,
        dataset: str = "embedded",
        root: str | None = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = False,
        seed: int = 0,
        shuffle_seed: int | None = None,
        val_fraction: float = 0.1,
        download: bool = False,
        convert_channels: bool = False,
        on_device: bool | str = "auto",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = None if root is None else str(root)
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.seed = seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.val_fraction = val_fraction
        self.download = download
        self.convert_channels = convert_channels
        self.on_device = on_device
        self._check_config()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._train_loader: ResumableDataLoader | None = None

    def _check_config(self) -> None:
        """Cheap config checks (no data access), each a one-line error."""
        name, channels = self.dataset, self.channels
        if name not in ds.DATASETS:
            raise ValueError(
                f"data.dataset={name!r} is unknown; choose one of {', '.join(ds.DATASETS)}"
            )
        if self.root is None and name not in ds.NO_ROOT:
            raise ValueError(f"data.root=None: dataset {name!r} needs data.root set to its folder")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} is unsupported; use 1 (grey) or 3 (RGB)")
        native = ds.NATIVE_CHANNELS.get(name)
        if native is not None and channels != native and not self.convert_channels:
            raise ValueError(
                f"data.channels={channels} does not match dataset {name!r}, which has {native}; "
                f"set data.channels={native}, or data.convert_channels=true to convert"
            )
        for key in ("image_size", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r} must be a positive integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r} must be an integer >= 0")
        if self.on_device not in (True, False, "auto"):
            raise ValueError(f"data.on_device={self.on_device!r} is invalid; use auto, true or "
                             "false")
        if self.on_device is True and self.dataset == "folder":
            raise ValueError("data.on_device=true needs an in-memory dataset; data.dataset="
                             "'folder' reads its files in the loader (use on_device=false)")
        for key in ("seed", "shuffle_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"data.{key}={value!r} must be an integer")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1)")

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Download (rank 0 only) when ``download`` is true; otherwise nothing."""
        if self.download and self.dataset in ("mnist", "fashion_mnist", "cifar10"):
            ds.download(self.dataset, self.root)

    def check_source(self) -> None:
        """Check that the images are where the config says, without loading them, so that a
        bad ``data.root`` fails before any work (raises the same one-line errors as setup)."""
        if self.dataset == "folder":
            ds.list_image_files(self.root)
        elif self.dataset == "embedded":
            ds.embedded_csv_path()
        elif self.dataset == "synthetic":
            return
        elif self.download:
            return  # prepare_data fetches what is missing
        elif self.dataset == "cifar10":
            if not (Path(str(self.root)).expanduser() / "cifar-10-batches-py").is_dir():
                ds.load_cifar10(self.root, train=True)  # raises the explanatory error
        else:
            for train in (True, False):
                stem = f"{'train' if train else 't10k'}-images-idx3-ubyte"
                root = Path(str(self.root)).expanduser()
                folders = (root, root / ds._MNIST_FOLDERS[self.dataset] / "raw")
                if not any((f / n).is_file() for f in folders for n in (stem, stem + ".gz")):
                    ds.load_mnist_like(self.dataset, self.root, train)  # raises

    def reference_set(self, split: str):
        """(dataset, name, cache-key suffix, info) of the images that FID reference statistics
        of ``split`` ("train", or "val"/"test": the held-out set) are computed from. The key
        and info carry what changes those images: the size, the channels and, for the
        embedded and folder datasets (split here), the seed, the fraction and the folder."""
        self.setup("fit")
        dataset = self.train_set if split == "train" else self.val_set
        name, suffix = self.dataset, ""
        info = {"dataset": name, "split": split, "image_size": self.image_size,
                "channels": self.channels}
        if self.channels != ds.NATIVE_CHANNELS.get(name):
            suffix += f"_c{self.channels}"
        if name in ("embedded", "folder"):
            info.update(seed=self.seed, val_fraction=self.val_fraction)
            suffix += f"_s{self.seed}v{self.val_fraction:g}"
        if name == "folder":
            info["root"] = str(Path(self.root).resolve())
            suffix += "_" + hashlib.sha1(info["root"].encode()).hexdigest()[:8]
        return dataset, name, suffix, info

    def setup(self, stage: str | None = None) -> None:
        """Build the train and val/test datasets (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        if self.dataset == "folder":
            full = ds.ImageFolderDataset.from_root(self.root, self.image_size, self.channels)
            self.train_set, self.val_set = self._split(full)
        elif self.dataset == "embedded":
            self.train_set, self.val_set = self._split(self._in_memory(None))
        else:
            self.prepare_data()  # no-op unless download=true; present files are not re-fetched
            self.train_set, self.val_set = self._in_memory(True), self._in_memory(False)
        self._check_sizes()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        """On the device: uint8 -> [-1, 1], then random flip (training batches only)."""
        if not isinstance(batch, Tensor) or batch.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image batch, got {type(batch).__name__}")
        images = to_model_range(batch)
        training = self.trainer.training if self.trainer is not None else True
        if training and self._train_loader is not None:
            self._train_loader.consumed += 1  # this batch reaches training_step
        if self.random_flip and training:
            # the global RNG: seeded by seed_everything and restored on resume
            images = random_hflip(images)
        return images

    # ------------------------------------------------------------------ helpers

    def _in_memory(self, train: bool | None) -> ds.TensorImageDataset:
        images = ds.load_fixed(self.dataset, self.root, train)
        images = ds.match_channels(images, self.channels)
        return ds.TensorImageDataset(ds.fit_size(images, self.image_size))

    def _split(self, full):
        """Seeded shuffle, then hold out ``val_fraction`` (0: val = train)."""
        n = len(full)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = round(n * self.val_fraction)
        if self.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        if n_val == 0:
            return full.subset(order), full.subset(order)
        return full.subset(order[n_val:]), full.subset(order[:n_val])

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _check_sizes(self) -> None:
        n_train, world = len(self.train_set), self._world_size()
        if n_train < self.batch_size * world:
            raise ValueError(
                f"data.batch_size={self.batch_size} (x{world} devices) exceeds the {n_train} "
                f"training images of {self.dataset!r}; lower data.batch_size or add images"
            )
        if len(self.val_set) == 0:
            raise ValueError(f"data.val_fraction={self.val_fraction}: empty validation set")

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DiffusionDataModule.setup() must run before asking for a loader")
        on_cuda = torch.cuda.is_available() and (
            self.trainer is None or self.trainer.strategy.root_device.type == "cuda"
        )
        kwargs = dict(
            batch_size=self.batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_cuda,
            collate_fn=ds.collate_images,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.shuffle_seed + (0 if train else 1)),
        )
        if not train:
            return DataLoader(dataset, **kwargs)
        world = self._world_size()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = EpochRandomSampler(dataset, self.shuffle_seed, num_replicas=world, rank=rank)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.on_device is True or (self.on_device == "auto" and device is not None
                                      and device.type == "cuda"
                                      and isinstance(dataset, ds.TensorImageDataset)):
            self._train_loader = DeviceLoader(dataset.images, sampler, self.batch_size,
                                              device or "cpu")
        else:
            self._train_loader = ResumableDataLoader(dataset, sampler=sampler, **kwargs)
        if self.trainer is not None:
            self._train_loader.epoch_batches = lambda: self.trainer.num_training_batches
        return self._train_loader
