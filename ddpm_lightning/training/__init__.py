"""The Lightning layer: the LightningModule, the data modules and datasets, the callbacks and
the checkpoint IO. It imports no Hydra or OmegaConf."""
