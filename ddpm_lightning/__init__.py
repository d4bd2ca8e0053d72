"""ddpm-lightning: Denoising Diffusion Probabilistic Models on PyTorch Lightning and Hydra.

The package is layered; each layer imports only from the layers above it in this list:

- ``core``: the math, without Lightning, Hydra or OmegaConf: schedules, the diffusion
  process, samplers and spacings, timestep sampling, the U-Net, the bits/dim estimate, the
  sampling loop;
- ``metrics``: FID/IS math, the Inception network and the cached reference statistics,
  without Lightning or Hydra;
- ``training``: the Lightning layer: the LightningModule, the data, the callbacks and the
  checkpoint IO, without Hydra or OmegaConf;
- ``app``: Hydra composition, run folders, resume, loggers; the only layer, with the
  command-line ``tools``, that imports Hydra or OmegaConf.
"""

__version__ = "0.1.0"
