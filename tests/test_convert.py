"""Importing diffusers ``UNet2DModel`` weights (google/ddpm-cifar10-32's format) into our UNet
(ddpm_lightning/tools/convert.py). Everything runs on randomly initialised diffusers models; nothing
is downloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm_lightning.core.unet import UNet
from ddpm_lightning.tools import convert

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = 35_746_307

# google/ddpm-cifar10-32's UNet2DModel config (dropout only acts in training)
CIFAR10 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
    "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "center_input_sample": False, "dropout": 0.1,
}
# a two-level miniature of the same family, and our UNet arguments for it
TINY = {**CIFAR10, "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
TINY_OURS = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
             "dropout": 0.1, "image_size": 16}


def diffusers_unet(config: dict, seed: int = 0):
    """A seeded UNet2DModel. diffusers zero-initialises nothing, and the GroupNorm affines
    (1 and 0 by default) are perturbed too, so that every mapped tensor matters."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_from_yaml() -> UNet:
    return instantiate(OmegaConf.load(ROOT / "conf" / "model" / "unet_cifar10.yaml"))


@pytest.fixture(scope="module")
def reference():
    """The diffusers model, its state dict, an input (x, t) and its ε̂."""
    model = diffusers_unet(CIFAR10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([10, 999])
    with torch.no_grad():
        eps = model(x, t).sample
    return model, model.state_dict(), x, t, eps


def max_diff(net: torch.nn.Module, ref) -> float:
    _, _, x, t, eps = ref
    with torch.no_grad():
        out = net.eval()(x, t)
    assert out.shape == eps.shape
    return (out - eps).abs().max().item()


# ------------------------------------------------------------------------ the golden test

def test_parameter_counts_match(reference):
    model, *_ = reference
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert sum(p.numel() for p in ours_from_yaml().parameters()) == N_PARAMS


def test_golden_same_eps_as_diffusers(reference):
    _, state_dict, *_ = reference
    assert reference[4].std() > 0.1  # a non-trivial output: nothing is zero-initialised
    net = ours_from_yaml()
    net.load_state_dict(convert.unet_from_diffusers(state_dict), strict=True)
    diff = max_diff(net, reference)
    print(f"max |eps_ours - eps_diffusers| = {diff:.3g}")
    assert diff < 1e-5  # measured 3e-6; the README states < 1e-5


def test_config_of_cifar10_model_is_accepted(reference, tmp_path):
    model, *_ = reference
    convert.check_diffusers_config(dict(model.config))
    model.save_config(tmp_path)  # config.json exactly as diffusers writes it
    convert.check_diffusers_config(json.loads((tmp_path / "config.json").read_text()))
    assert convert.expected_diffusers_config()["block_out_channels"] == [128, 256, 256, 256]


def test_generic_mapping_on_a_tiny_unet():
    d = diffusers_unet(TINY, seed=3)
    convert.check_diffusers_config(dict(d.config), TINY_OURS)
    net = UNet(**TINY_OURS)
    net.load_state_dict(convert.unet_from_diffusers(d.state_dict(), TINY_OURS), strict=True)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 17, 999])
    with torch.no_grad():
        assert (net.eval()(x, t) - d(x, t).sample).abs().max() < 1e-4


def test_legacy_attention_names_and_conv_shaped_weights(reference):
    _, state_dict, *_ = reference
    new = convert.unet_from_diffusers(state_dict)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in state_dict.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
        if m:
            k = f"{m[1]}{legacy[m[2]]}.{m[3]}"
            v = v[..., None, None] if m[3] == "weight" else v  # as a 1x1 conv
        old[k] = v
    assert len(old) == len(state_dict) and "mid_block.attentions.0.proj_attn.weight" in old
    converted = convert.unet_from_diffusers(old)
    assert converted.keys() == new.keys()
    assert all(torch.equal(converted[k], new[k]) for k in new)


def test_diffusers_key_names():
    assert convert.diffusers_key("mid.attn.proj_out.weight") == "mid_block.attentions.0.to_out.0.weight"
    assert convert.diffusers_key("up.2.blocks.1.shortcut.bias") == \
        "up_blocks.2.resnets.1.conv_shortcut.bias"
    assert convert.diffusers_key("down.0.resample.conv.weight") == \
        "down_blocks.0.downsamplers.0.conv.weight"
    assert convert.diffusers_key("norm_out.weight") == "conv_norm_out.weight"
    with pytest.raises(KeyError):
        convert.diffusers_key("mid.attn.nothing.weight")


# ------------------------------------------------------------------------------ the CLI

def test_cli_end_to_end(reference, tmp_path):
    model, *_ = reference
    src, out = tmp_path / "ddpm-cifar10-32", tmp_path / "ckpt" / "ddpm_cifar10.ckpt"
    model.save_pretrained(src)  # config.json + diffusion_pytorch_model.safetensors
    proc = subprocess.run([sys.executable, "-m", "ddpm_lightning.tools.convert", str(src), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 0 and ckpt["epoch"] == 0
    assert ckpt["pytorch-lightning_version"]
    run_config = ckpt["hyper_parameters"]["run_config"]
    assert run_config == convert.compose_run_config("cifar10_ddpm")
    assert "hydra" not in run_config and run_config["name"] == "cifar10_ddpm"
    assert run_config["schedule"]["T"] == 1000

    sd = ckpt["state_dict"]
    ema = {k[len("ema_model."):]: v for k, v in sd.items() if k.startswith("ema_model.")}
    raw = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    assert len(sd) == len(ema) + len(raw) and ema.keys() == raw.keys()
    assert all(torch.equal(ema[k], raw[k]) for k in ema)

    net = instantiate(run_config["model"])
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS
    net.load_state_dict(ema, strict=True)
    assert max_diff(net, reference) < 1e-4

    # the LightningModule rebuilt from the run config takes the whole state dict strictly
    module = instantiate(run_config["module"], model=net,
                         betas=instantiate(run_config["schedule"]), run_config=run_config,
                         _recursive_=False)
    module.load_state_dict(sd, strict=True)
    assert module.hparams.run_config == run_config


def test_bin_weights_and_single_file(reference, tmp_path):
    _, state_dict, *_ = reference
    expected = convert.unet_from_diffusers(state_dict)
    folder = tmp_path / "bin_model"
    folder.mkdir()
    torch.save(state_dict, folder / "diffusion_pytorch_model.bin")
    for src in (folder, folder / "diffusion_pytorch_model.bin"):
        loaded, config, _ = convert.load_diffusers_weights(src)
        assert config is None
        got = convert.unet_from_diffusers(loaded)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------- the errors

@pytest.mark.parametrize("edit, key", [
    ("missing", "mid_block.attentions.0.to_q.weight"),
    ("extra", "mid_block.attentions.1.to_q.weight"),
    ("shape", "up_blocks.3.resnets.0.conv_shortcut.weight"),
])
def test_bad_state_dict_names_the_key(reference, edit, key):
    sd = dict(reference[1])
    if edit == "missing":
        del sd[key]
    elif edit == "extra":
        sd[key] = torch.zeros(256, 256)
    else:
        sd[key] = sd[key][:, :256]
    with pytest.raises(ValueError, match=re.escape(repr(key))) as info:
        convert.unet_from_diffusers(sd)
    assert {"missing": "missing key", "extra": "unexpected key", "shape": "has shape"}[edit] \
        in str(info.value)


@pytest.mark.parametrize("change, key", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"block_out_channels": [128, 256, 512, 512]}, "block_out_channels"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
     "up_block_types"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ({"downsample_padding": None}, "downsample_padding"),  # absent: diffusers' default 1
])
def test_other_architecture_config_is_refused(reference, change, key):
    config = dict(reference[0].config)
    config.update({k: v for k, v in change.items() if v is not None})
    for k, v in change.items():
        if v is None:
            del config[k]
    with pytest.raises(ValueError, match=rf"config\.json: {key}="):
        convert.check_diffusers_config(config)


def test_cli_refuses_other_architecture(tmp_path, capsys):
    src = tmp_path / "other"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**CIFAR10, "_class_name": "UNet2DModel",
                                                 "flip_sin_to_cos": True}))
    torch.save({"conv_in.weight": torch.zeros(1)}, src / "diffusion_pytorch_model.bin")
    out = tmp_path / "out.ckpt"
    assert convert.main([str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config.json: flip_sin_to_cos=True") and not out.exists()
    assert convert.main([str(tmp_path / "nowhere"), str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_write_checkpoint_checks_weights_against_config(tmp_path):
    tiny = UNet(**TINY_OURS).state_dict()
    with pytest.raises(ValueError, match="shape"):
        convert.write_checkpoint(tiny, tmp_path / "x.ckpt")  # default: the CIFAR-10 config
    assert not any(tmp_path.iterdir())


def test_compose_keeps_an_initialised_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        rc = convert.compose_run_config("cifar10_ddpm")
        assert compose(config_name="train").name == "cpu_embedded"  # still usable
    assert rc["model"]["_target_"] == "ddpm_lightning.core.unet.UNet"


def test_a_pipeline_scheduler_sets_v_prediction_and_zero_terminal_snr(reference, tmp_path):
    """A diffusers pipeline folder (unet/ and scheduler/): its scheduler's prediction_type,
    schedule, T and rescale_betas_zero_snr become the run config's; an override that
    contradicts it, or a schedule with no equivalent here, is refused in one line."""
    from diffusers import DDPMScheduler

    model, *_ = reference
    src = tmp_path / "pipeline"
    model.save_pretrained(src / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
                  rescale_betas_zero_snr=True).save_pretrained(src / "scheduler")
    assert convert.scheduler_overrides(src) == [
        "module.parameterization=v", "schedule=linear", "schedule.T=1000",
        "schedule.rescale_zero_terminal_snr=true", "schedule.beta_start=0.0001",
        "schedule.beta_end=0.02"]
    out = convert.convert(src, tmp_path / "v.ckpt")
    run_config = torch.load(out, weights_only=True)["hyper_parameters"]["run_config"]
    assert run_config["module"]["parameterization"] == "v"
    assert run_config["schedule"]["rescale_zero_terminal_snr"] is True
    with pytest.raises(ValueError, match="module.parameterization=eps contradicts the diffusers "
                                         "scheduler config"):
        convert.convert(src, tmp_path / "x.ckpt", overrides=["module.parameterization=eps"])
    DDPMScheduler(beta_schedule="scaled_linear").save_pretrained(src / "scheduler")
    with pytest.raises(ValueError, match="beta_schedule='scaled_linear' has no equivalent"):
        convert.scheduler_overrides(src)
