"""Commands outside the library's core path: the training-step bench, the diffusers weight
converter, the FID-against-NFE study, the sweep comparison report and its readers."""

import ddpm_lightning.app  # noqa: F401  (the config resolvers)
