"""The math of DDPM, with no Lightning, Hydra or OmegaConf: schedules, the diffusion
process and its bound, samplers and spacings, timestep sampling, the U-Net, sampling loops."""
