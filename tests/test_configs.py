"""Every config in conf/ composes and instantiates; the run identity carries the swept keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm_lightning.app import loggers, runtime

from helpers import compose

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["schedule", "model", "module", "data", "trainer", "logger", "callbacks", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _compose(*overrides, hydra=False):
    return compose("train", *overrides, hydra=hydra)


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
    if group == "module" and _compose(*overrides).module.parameterization in ("eps", "mu"):
        overrides.append("schedule=linear")  # the default ᾱ_T = 0 refuses ε (tests/test_recipe.py)
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
    assert cfg.module.objective == "simple" and cfg.module.variance == "fixed_large"
    assert cfg.module.sampler.name == "ddpm" and cfg.module.sampler.variance is None  # = β_t
    assert cfg.module.sampler.steps is None  # Table 1: all 1000 steps
    assert cfg.data.batch_size == 128 and cfg.data.random_flip is True
    assert cfg.model.dropout == 0.1 and cfg.model._target_.endswith("UNet")
    assert cfg.trainer.max_steps == 800_000 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.data.dataset == "cifar10"


@pytest.mark.parametrize("experiment", ["cifar10_ddpm", "cifar10_ddpm_vlb", "celebahq256_ddpm",
                                        "lsun_church256_ddpm", "cifar10_table2", "table2_cpu"])
def test_paper_recipes_keep_the_2020_recipe(experiment):
    """The newer parts (v-prediction, min-SNR weighting, zero terminal SNR, post-hoc EMA) are
    off in every paper recipe, Table 2's rows included."""
    rows = ["+ablation=mu_vlb_learned", "+ablation=eps_simple"] \
        if "table2" in experiment else [None]
    for row in rows:
        cfg = _compose(f"experiment={experiment}", *([row] if row else []))
        assert cfg.module.parameterization in ("eps", "mu")
        assert cfg.module.loss_weight == "none" and cfg.module.ema == "plain"
        assert cfg.schedule.rescale_zero_terminal_snr is False


@pytest.mark.parametrize("experiment", ["cpu_embedded", "fashion_mnist_cpu"])
def test_cpu_recipes_sample_with_the_fast_default(experiment):
    """module.sampler (grids, sample.py) of the CPU recipes is the study's best sampler per
    NFE; callbacks=fid and callbacks=eval use it too (the paper recipe keeps DDPM-1000)."""
    cfg = _compose(f"experiment={experiment}")
    s = cfg.module.sampler
    assert (s.name, s.sde, s.steps, s.clip) == ("dpm_solver", True, 50, "raw_eps")
    assert not cfg.callbacks.sample_grid.get("sampler")
    for option, steps in (("fid", 50), ("eval", 20)):
        fast = _compose(f"experiment={experiment}", f"callbacks={option}").callbacks[option]
        assert (fast.sampler.name, fast.sampler.sde, fast.sampler.steps) == \
            ("dpm_solver", True, steps)


@pytest.mark.parametrize("experiment, precision, back", [
    ("cpu_embedded", "32-true", ()), ("fashion_mnist_cpu", "bf16-mixed", ("trainer=cpu",))])
def test_cpu_recipes_are_the_studys_choice(experiment, precision, back):
    """The CPU recipes adopt the objective the recipe study chose (v, min-SNR, ᾱ_T = 0);
    fashion_mnist_cpu also its bf16, cpu_embedded (`make train`, any CPU) stays in float32. The
    README's command for the 2020 recipe gives it back exactly."""
    cfg = _compose(f"experiment={experiment}")
    assert (cfg.module.parameterization, cfg.module.loss_weight) == ("v", "min_snr")
    assert cfg.schedule.rescale_zero_terminal_snr is True and cfg.schedule.name == "linear"
    assert cfg.trainer.precision == precision
    old = _compose(f"experiment={experiment}", "schedule=linear", "module=ddpm_cpu", *back)
    assert (old.module.parameterization, old.module.loss_weight) == ("eps", "none")
    assert old.schedule.rescale_zero_terminal_snr is False
    assert old.trainer.precision == "32-true"
    for key in ("model", "data"):  # the rest of the recipe is shared
        assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(old[key])
    assert {k: v for k, v in cfg.module.items() if k not in ("parameterization", "loss_weight")} \
        == {k: v for k, v in old.module.items() if k not in ("parameterization", "loss_weight")}


GROUP_OPTIONS = [(g, o) for g, o in OPTIONS if g != "experiment"]


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_a_command_line_group_choice_arrives_unchanged(group, option):
    """The default experiment selects group options; it must not write over the one the user
    picks (it did: model=unet_cifar10 gave the CPU recipe's 702,499-parameter network)."""
    root = ["data.root=/x"] if group == "data" else []
    with_default = _compose(f"{group}={option}", *root)
    alone = _compose(f"{group}={option}", "~experiment", *root)
    assert OmegaConf.to_container(with_default[group]) == OmegaConf.to_container(alone[group])
    assert with_default.name == "cpu_embedded"  # the default experiment was applied


def test_unet_cifar10_on_the_command_line_is_the_papers_network():
    cfg = _compose("model=unet_cifar10")
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


@pytest.mark.parametrize("experiment", [o for g, o in OPTIONS if g == "experiment"])
def test_recipes_hold_no_numbers_of_the_method_groups(experiment):
    """Each number of a recipe stands in one file: experiments select schedule, model and
    module options and never repeat or patch their values."""
    raw = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    for group in ("schedule", "model", "module"):
        assert group not in raw, f"experiment/{experiment}.yaml sets {group} keys"


def test_cpu_recipe_values_come_from_its_group_options():
    cfg = _compose()
    assert (cfg.model.ch, list(cfg.model.ch_mult), cfg.model.image_size) == (32, [1, 2], 16)
    assert (cfg.data.image_size, cfg.data.batch_size) == (16, 64)
    assert (cfg.module.lr, cfg.module.warmup_steps, cfg.module.ema_decay) == (2e-3, 100, 0.995)
    assert cfg.trainer.max_steps == 3000
    assert sum(p.numel() for p in instantiate(cfg.model).parameters()) == 701_345


def test_256_recipes_sample_with_the_small_variance():
    for experiment in ("celebahq256_ddpm", "lsun_church256_ddpm"):
        cfg = _compose(f"experiment={experiment}", "data.root=/x")
        assert cfg.module.variance == "fixed_small" and cfg.module.lr == 2e-5
        assert cfg.model.dropout == 0.0 and cfg.data.batch_size == 32  # fits 80 GB
        total = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
        assert total == 64  # the paper's batch
    assert _compose("experiment=lsun_church256_ddpm", "data.root=/x").trainer.max_steps == 1_200_000
    assert _compose("experiment=celebahq256_ddpm", "data.root=/x").trainer.max_steps == 500_000


def test_run_identity_carries_the_swept_keys():
    cfg = _compose("experiment=cpu_embedded", "schedule=cosine", "module.lr=0.001",
                   "trainer.devices=1", hydra=True)
    HydraConfig.instance().set_config(cfg)
    ident = loggers.run_identity(cfg, HydraConfig.get())
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
    # a sweep's job (outputs_root None) never resumes a sibling job's run
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", None) is None
    assert runtime.find_resume_checkpoint("auto", tmp_path / "old", None) == old / "last.ckpt"


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
    assert cfg.trainer.strategy._target_.endswith("distributed.ddp") and cfg.trainer.num_nodes == 2
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.nodes == 2
    # what srun sets for task 3 of 4 (node 1, local rank 1)
    for key, value in {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1",
                       "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
                       "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(key, value)
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False,
                          default_root_dir=str(tmp_path))
    env = trainer.strategy.cluster_environment
    assert trainer.strategy._timeout.total_seconds() == 600  # trainer.strategy.timeout_minutes
    assert isinstance(env, SLURMEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)


def _fake_run(root, name, settings, job=None):
    """A run folder with a last.ckpt that records ``settings`` (and, with ``job``, the SLURM
    job that started it)."""
    import time

    import torch

    ckpt = root / name / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"run_config": settings}}, ckpt)
    if job:
        (root / name / runtime.SLURM_MARK).write_text(job + "\n")
    time.sleep(0.01)  # distinct modification times: the newest is the last made
    return ckpt


def test_resume_auto_compares_what_a_run_computes(tmp_path, monkeypatch):
    """Speed and bookkeeping keys (compile, channels-last, the strategy, loggers, callbacks)
    and keys a checkpoint does not record (options added since) are not settings; the lr is."""
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    saved = {"module": {"lr": 1e-3, "compile": False}, "trainer": {"strategy": "ddp"},
             "logger": {"name": "a"}}
    old = _fake_run(tmp_path, "old", saved)
    same = {"module": {"lr": 1e-3, "compile": True, "tf32": True},
            "trainer": {"strategy": {"_target_": "x"}, "max_steps": 9}, "logger": {"name": "b"}}
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", tmp_path, same) == old
    notes = []
    other = {**same, "module": {"lr": 5e-4}}
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", tmp_path, other,
                                          notes) is None
    assert notes == [f"resume=auto: starting a fresh run: the newest run of this experiment, "
                     f"{old.parent.parent}, was trained with other settings: module.lr=0.001 "
                     "(this run: 0.0005)"]


def test_slurm_runs_resume_their_own_job_only_when_requeued(tmp_path, monkeypatch):
    """In a requeued SLURM job the run of that job is continued from its latest checkpoint,
    whatever resume= says (null, auto, or the PATH it first resumed from). Not requeued (several
    runs in one allocation), resume=auto compares settings as anywhere else."""
    for key in ("SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    settings = {"module": {"lr": 1e-3}}
    first = _fake_run(tmp_path, "first", settings, job="42")
    mine = _fake_run(tmp_path, "mine", {"module": {"lr": 5e-4}}, job="42")
    _fake_run(tmp_path, "another_job", {"module": {"lr": 5e-4}}, job="41")
    assert runtime.find_resume_checkpoint(None, tmp_path / "new", tmp_path, settings) is None
    assert runtime.find_resume_checkpoint("auto", tmp_path / "new", tmp_path, settings) == first
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for resume in (None, "auto", str(first)):
        assert runtime.find_resume_checkpoint(resume, tmp_path / "new", tmp_path,
                                              settings) == mine, resume
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # a requeued job with no run of its own yet
    assert runtime.find_resume_checkpoint(None, tmp_path / "new", tmp_path, settings) is None


def test_bf16_on_a_cpu_without_native_bf16_gets_a_one_line_note(monkeypatch):
    import torch

    cfg = _compose("experiment=fashion_mnist_cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert runtime.bf16_note(cfg.trainer) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    note = runtime.bf16_note(cfg.trainer)
    assert "trainer.precision=bf16-mixed" in note and "trainer=cpu" in note
    assert "\n" not in note
    assert runtime.bf16_note(_compose("experiment=fashion_mnist_cpu", "trainer=cpu").trainer) \
        is None
