"""Every config in conf/ composes and instantiates; the run identity carries the swept keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm_lightning import runtime

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["schedule", "model", "module", "data", "trainer", "logger", "callbacks", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _compose(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), group
    assert {"linear", "cosine", "quadratic", "sigmoid"} <= {o for g, o in OPTIONS if g == "schedule"}
    assert {"cpu", "gpu", "ddp"} <= {o for g, o in OPTIONS if g == "trainer"}
    assert {"wandb", "csv", "none"} <= {o for g, o in OPTIONS if g == "logger"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [f"{group}={option}"]
    cfg = _compose(*overrides, "data.root=" + str(tmp_path)) if group in ("data", "experiment") \
        else _compose(*overrides)
    OmegaConf.resolve(cfg)
    betas = instantiate(cfg.schedule)
    assert isinstance(betas, np.ndarray) and len(betas) == cfg.schedule.T
    if group in ("model", "experiment"):
        model = instantiate(cfg.model)
        assert model.image_size == cfg.model.image_size
    tiny = instantiate(_compose("model=unet_tiny").model)
    module = instantiate(cfg.module, model=tiny, betas=betas, _recursive_=False)
    assert module.diffusion.num_timesteps == cfg.schedule.T
    data = instantiate(cfg.data)
    assert data.hparams.image_size == cfg.data.image_size
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False,
                          default_root_dir=str(tmp_path))
    assert trainer.max_steps == cfg.trainer.max_steps
    if cfg.logger and "_target_" in cfg.logger:
        logger = instantiate(cfg.logger, save_dir=str(tmp_path))
        assert logger is not None
    for name, cb in cfg.callbacks.items():
        if cb and "_target_" in cb:
            assert instantiate(cb) is not None, name


def test_paper_recipe_is_exact():
    cfg = _compose("experiment=cifar10_ddpm")
    assert cfg.schedule.name == "linear" and cfg.schedule.T == 1000
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.module.lr == 2e-4 and cfg.module.warmup_steps == 5000
    assert list(cfg.module.adam_betas) == [0.9, 0.999] and cfg.module.adam_eps == 1e-8
    assert cfg.module.ema_decay == 0.9999 and cfg.module.parameterization == "eps"
    assert cfg.module.objective == "simple" and cfg.module.sampler.variance == "large"
    assert cfg.data.batch_size == 128 and cfg.data.random_flip is True
    assert cfg.model.dropout == 0.1 and cfg.model._target_.endswith("UNet")
    assert cfg.trainer.max_steps == 800_000 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.data.dataset == "cifar10"


def test_run_identity_carries_the_swept_keys():
    cfg = _compose("experiment=cpu_embedded", "schedule=cosine", "module.lr=0.001",
                   "trainer.devices=1", hydra=True)
    HydraConfig.instance().set_config(cfg)
    ident = runtime.run_identity(cfg, HydraConfig.get())
    assert ident["name"] == "cpu_embedded:experiment=cpu_embedded,schedule=cosine,module.lr=0.001"
    assert ident["group"] == "cpu_embedded"  # a single run: grouped by experiment
    assert "trainer.devices=1" not in ident["overrides"]  # bookkeeping keys are not "swept"


def test_find_resume_checkpoint(tmp_path):
    assert runtime.find_resume_checkpoint(None, tmp_path, tmp_path) is None
    with pytest.raises(runtime.ConfigError, match="resume=/nope/x.ckpt does not exist"):
        runtime.find_resume_checkpoint("/nope/x.ckpt", tmp_path, tmp_path)
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", tmp_path) is None
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    (old / "last.ckpt").write_bytes(b"x")
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", tmp_path) == old / "last.ckpt"


def test_slurm_path_composes_and_lightning_detects_slurm(monkeypatch, tmp_path):
    """Multi-node cannot run here; check the config and Lightning's SLURM detection."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utilities_rank_zero_only

    # Building a Trainer in a (faked) SLURM task sets the process-wide rank to 3; put it back
    # afterwards, or every later test in this process would think it is not rank zero.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    monkeypatch.setattr(utilities_rank_zero_only, "rank", getattr(utilities_rank_zero_only, "rank", 0))

    cfg = _compose("experiment=cifar10_ddpm", "trainer=slurm", "trainer.num_nodes=2",
                   "trainer.devices=2", "hydra/launcher=submitit_slurm",
                   "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=2", hydra=True)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.nodes == 2
    # what srun sets for task 3 of 4 (node 1, local rank 1)
    for key, value in {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1",
                       "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
                       "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(key, value)
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False,
                          default_root_dir=str(tmp_path))
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)
