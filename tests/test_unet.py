"""Tests of the DDPM U-Net ε_θ(x_t, t) (ddpm_lightning/core/unet.py) and its Hydra configs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm_lightning.core.unet import UNet, timestep_embedding

CONF = Path(__file__).parents[1] / "conf" / "model"


def build(name: str) -> UNet:
    return instantiate(OmegaConf.load(CONF / f"{name}.yaml"))


def randomize(model: UNet) -> UNet:
    """Give every parameter (zero-initialised ones included) a generic non-zero value."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if is_gain else 0.0))
    return model


@pytest.mark.parametrize("name, expected", [("unet_cifar10", 35_746_307), ("unet_256", 113_673_219)])
def test_paper_parameter_counts(name, expected):
    model = build(name)
    assert isinstance(model, UNet)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_config_shape_and_out_channels():
    model = build("unet_tiny")
    x = torch.randn(4, 1, 32, 32)
    assert model(x, torch.randint(0, 1000, (4,))).shape == x.shape
    learned_var = UNet(in_channels=1, out_channels=2, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                       attn_resolutions=[16], dropout=0.0, image_size=32)
    assert learned_var(x, torch.rand(4) * 999).shape == (4, 2, 32, 32)  # float timesteps


def test_cifar10_forward_shape():
    model = build("unet_cifar10").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x, torch.tensor([999])).shape == x.shape


def test_fresh_model_outputs_exact_zeros():
    model = build("unet_tiny")
    out = model(torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999]))
    assert torch.equal(out, torch.zeros_like(out))
    assert model.conv_in.weight.abs().sum() > 0  # only the documented layers are zero


def test_timestep_embedding_matches_paper_formula():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))


def test_output_depends_on_timestep_and_scalar_t_broadcasts():
    model = randomize(build("unet_tiny")).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a, b = model(x, torch.tensor([5, 5])), model(x, torch.tensor([900, 900]))
        assert not torch.allclose(a, b)
        assert torch.equal(model(x, torch.tensor(5)), a)


BASE = {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
        "dropout": 0.1, "image_size": 32}


@pytest.mark.parametrize("override, needle", [
    ({"image_size": 30}, r"model\.image_size=30 must be divisible by 2\*\*\(levels-1\)=8"),
    ({"attn_resolutions": [10]}, r"model\.attn_resolutions=\[10\].*valid: \[32, 16, 8, 4\]"),
    ({"ch": 48}, r"model\.ch=48 must be a multiple of 32"),
    ({"ch": 16, "ch_mult": [2, 4]}, r"model\.ch=16 must be a multiple of 32"),
    ({"ch_mult": [1, 0]}, r"model\.ch_mult=\[1, 0\] must be a non-empty list of positive"),
    ({"image_size": 0}, r"model\.image_size=0 must be a positive integer"),
    ({"attn_resolutions": [16, 64]}, r"model\.attn_resolutions=\[16, 64\] contains 64"),
    ({"ch": 0}, r"model\.ch=0 must be a positive integer"),
    ({"num_res_blocks": 0}, r"model\.num_res_blocks=0 must be a positive integer"),
    ({"dropout": 1.0}, r"model\.dropout=1\.0 must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"model\.dropout=-0\.1 must be in \[0, 1\)"),
    ({"ch_mult": []}, r"model\.ch_mult=\[\] must be a non-empty list"),
])
def test_invalid_config_raises_value_error_naming_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        UNet(**{**BASE, **override})


def test_adam_steps_fit_fixed_target_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    model = build("unet_tiny")
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = F.mse_loss(model(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Zero-init layers open up after a couple of steps; by now every weight must learn.
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead
    assert losses[-1] < 0.85 * losses[0], losses


def test_channels_last_matches_contiguous():
    model = randomize(build("unet_tiny")).eval()
    x = torch.randn(2, 1, 32, 32)
    x3 = torch.randn(2, 3, 32, 32)
    rgb = randomize(UNet(in_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                         attn_resolutions=[16], dropout=0.0, image_size=32)).eval()
    with torch.no_grad():
        for net, inp in ((model, x), (rgb, x3)):
            t = torch.tensor([3, 700])
            out_cl = net(inp.contiguous(memory_format=torch.channels_last), t)
            out_c = net(inp.contiguous(), t)
            assert out_cl.is_contiguous(memory_format=torch.channels_last)
            assert out_c.is_contiguous()
            torch.testing.assert_close(out_cl, out_c, atol=1e-5, rtol=0)
            # Weights in the classic NCHW layout give the same function too.
            ref = net.to(memory_format=torch.contiguous_format)(inp.contiguous(), t)
            torch.testing.assert_close(ref, out_c, atol=1e-5, rtol=0)
            net.to(memory_format=torch.channels_last)
