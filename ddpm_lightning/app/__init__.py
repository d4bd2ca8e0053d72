"""The application layer: Hydra composition, run folders, resume and loggers. With the
command-line ``tools`` it is the only part of the package that imports Hydra or OmegaConf."""

from pathlib import Path

from omegaconf import OmegaConf

# ${mul:a,b} in configs, e.g. model.out_channels: ${mul:2,${model.in_channels}} for a learned Σ
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)

# The Hydra config groups, next to the package in the source tree.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
