"""Sample-quality metrics without Lightning or Hydra: FID/IS, the Inception network, the
cached reference statistics of datasets."""
