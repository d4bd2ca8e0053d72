"""ddpm-lightning: Denoising Diffusion Probabilistic Models on PyTorch Lightning and Hydra."""

from omegaconf import OmegaConf

# ${mul:a,b} in configs, e.g. model.out_channels: ${mul:2,${model.in_channels}} for a learned Σ
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)

__version__ = "0.1.0"
