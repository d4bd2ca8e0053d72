"""Speed options and fast paths compute the same thing as the plain path (ddpm_lightning/core/unet.py,
DDPM(channels_last=..., compile=...)), bf16-mixed trains like fp32, and the benchmark
(ddpm_lightning/tools/bench.py) runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.core import unet as unet_mod
from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training.module import DDPM

ROOT = Path(__file__).resolve().parents[1]
# Two levels at 16x16: the upsample reads an 8x8 map (the CPU transposed-conv path) and the
# 8x8 level has attention. No dropout, so that training-mode outputs are deterministic.
TINY = {"in_channels": 1, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
        "attn_resolutions": [8], "dropout": 0.0, "image_size": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these checks are about numbers, and a second OpenMP thread only
    slows them down (a lot) when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Generic non-zero values for every parameter (the zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + gain)
    return model


def tiny_module(**speed) -> DDPM:
    torch.manual_seed(0)
    return DDPM(randomize(UNet(**TINY)), make_beta_schedule("linear", 100), **speed)


def fixed_batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([0, 7, 50, 99])[:n]
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise


def loss_and_grads(module: DDPM, precision: str = "32"):
    """L_simple on the fixed batch (fixed t and ε) and the gradient of every parameter."""
    x0, t, noise = fixed_batch()
    module.model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        losses, _ = module.diffusion.training_loss(module.model, x0, t=t, noise=noise)
        loss = losses.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


def assert_grads_close(a: dict, b: dict, rtol: float) -> None:
    """Every gradient within ``rtol`` of its own size, or of 1% of the largest gradient for
    the parameters whose gradient is ~0 (e.g. a conv bias right before a GroupNorm with one
    channel per group)."""
    assert a.keys() == b.keys()
    floor = 0.01 * max(g.abs().max() for g in a.values())
    for name, grad in a.items():
        scale = torch.maximum(grad.abs().max(), floor)
        err = (grad - b[name]).abs().max()
        assert err <= rtol * scale, f"{name}: max |Δgrad| {err:.3g} vs max |grad| {scale:.3g}"


# ------------------------------------------------------------------ fast paths of the U-Net

@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_upsample_transposed_conv_equals_nearest_then_conv(size, channels_last):
    torch.manual_seed(0)
    up = unet_mod.Upsample(32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    up.to(memory_format=fmt)
    x = torch.randn(2, 32, size, size).contiguous(memory_format=fmt).requires_grad_()
    fast = up(x)
    plain = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(plain)
    gx_fast, gw_fast = torch.autograd.grad(fast, (x, up.conv.weight), g)
    gx_plain, gw_plain = torch.autograd.grad(plain, (x, up.conv.weight), g)
    torch.testing.assert_close(gx_fast, gx_plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw_fast, gw_plain, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("h, w", [(8, 8), (32, 48)])  # explicit GEMMs / SDPA (> 1024 tokens)
def test_attention_block_equals_textbook_formula(h, w):
    torch.manual_seed(0)
    c = 64
    block = randomize(unet_mod.AttnBlock(c)).to(memory_format=torch.channels_last)
    x = torch.randn(2, c, h, w).contiguous(memory_format=torch.channels_last)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = block.q(tokens), block.k(tokens), block.v(tokens)
    attn = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
    expected = x + block.proj_out(attn).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=2e-5, rtol=1e-5)


def test_bf16_groupnorm_is_normalised_in_float32():
    norm = unet_mod._norm(64)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last).bfloat16()
    out = unet_mod._norm_act(norm, x)  # autocast's case: bf16 activations, fp32 parameters
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.silu(norm(x.float())))
    assert unet_mod._norm_act(norm.bfloat16(), x).dtype == torch.bfloat16  # a bf16 network


def test_bf16_network_without_autocast_runs():
    net = UNet(**TINY).bfloat16()
    out = net(torch.randn(2, 1, 16, 16, dtype=torch.bfloat16), torch.tensor([1, 50]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 16, 16)


# --------------------------------------------------------------- the DDPM speed options

def test_channels_last_option_same_loss_gradients_and_keys():
    fast, plain = tiny_module(channels_last=True), tiny_module(channels_last=False)
    assert fast.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.ema_model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.model.conv_in.weight.is_contiguous()
    assert fast.state_dict().keys() == plain.state_dict().keys()
    loss_fast, grads_fast = loss_and_grads(fast)
    loss_plain, grads_plain = loss_and_grads(plain)
    assert loss_plain > 0.05  # a non-trivial prediction: nothing is zero-initialised
    torch.testing.assert_close(loss_fast, loss_plain, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads_fast, grads_plain, rtol=1e-4)


def test_bf16_autocast_loss_close_to_fp32():
    module = tiny_module()
    loss32, grads32 = loss_and_grads(module)
    loss16, grads16 = loss_and_grads(module, "bf16-mixed")
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert_grads_close(grads16, grads32, rtol=0.1)


def _can_compile() -> bool:
    return hasattr(torch, "compile") and any(shutil.which(c) for c in ("cc", "gcc", "g++"))


@pytest.mark.slow  # inductor compiles the forward and backward: about a minute on 2 CPUs
@pytest.mark.skipif(not _can_compile(), reason="torch.compile needs a C/C++ compiler")
def test_compile_option_same_loss_keys_and_eager_ema(tmp_path):
    compiled, plain = tiny_module(compile=True), tiny_module()
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert getattr(compiled.ema_model, "_compiled_call_impl", None) is None  # EMA stays eager
    loss_c, grads_c = loss_and_grads(compiled)
    loss_p, grads_p = loss_and_grads(plain)
    torch.testing.assert_close(loss_c, loss_p, atol=1e-5, rtol=1e-4)
    assert_grads_close(grads_c, grads_p, rtol=1e-3)
    compiled.update_ema()  # still works, and a checkpoint round trip keeps the names
    torch.save(compiled.state_dict(), tmp_path / "w.pt")
    plain.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)


# ------------------------------------------------------------------ bf16-mixed training

class _Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _train(precision: str, steps: int = 60) -> list[float]:
    from ddpm_lightning.training.data import DiffusionDataModule

    L.seed_everything(0, verbose=False)
    model = UNet(**TINY)
    module = DDPM(model, make_beta_schedule("linear", 1000), lr=2e-3, warmup_steps=0,
                  ema_decay=0.99)
    data = DiffusionDataModule(image_size=16, batch_size=16, seed=0)
    losses = _Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[losses])
    trainer.fit(module, datamodule=data)
    assert len(losses.values) == steps
    return losses.values


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_bf16_mixed_training_tracks_fp32():
    fp32, bf16 = _train("32-true"), _train("bf16-mixed")
    first, last32, last16 = (sum(v) / len(v) for v in (fp32[:10], fp32[-20:], bf16[-20:]))
    assert last32 < 0.5 * first, (first, last32)  # it learned something
    assert abs(last16 - last32) <= 0.05 * last32, (last16, last32)


# ---------------------------------------------------------------------------- benchmark

def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_lightning.tools.bench", "--quick", "--threads", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train" in proc.stdout and "sampler overhead" in proc.stdout
    result = json.loads(out.read_text())
    assert {"config", "peak_gflops", "flops", "precision", "dataloader", "targets",
            "notes"} <= result.keys()
    assert result["config"]["threads"] == 1
    for key in ("fp32_matmul", "fp32_conv", "bf16_matmul", "fp32", "bf16"):
        assert result["peak_gflops"][key] > 0
    has_diffusers = result["config"]["diffusers"] is not None
    assert set(result["flops"]) == ({"ours", "diffusers"} if has_diffusers else {"ours"})
    for precision in ("32", "bf16-mixed"):
        entry = result["precision"][precision]
        for what in ("train", "forward"):
            ours = entry["ours"][what]
            assert ours["images_per_s"]["min"] <= ours["images_per_s"]["median"] \
                <= ours["images_per_s"]["max"]
            assert ours["gflops"] > 0 and 0 < ours["fraction_of_peak"]
        if has_diffusers:
            assert entry["speedup"]["train"] > 0
        for name in ("ddpm", "ddim"):
            assert entry["sampler"][name]["step_over_forward"]["median"] > 0
            assert entry["sampler"][name]["loop_over_forward"] >= 0
    assert result["dataloader"]["images_per_s"]["median"] > 0
    assert result["dataloader"]["over_train"]["32"] > 0
    assert result["targets"]["paper_config"] is False
    assert "dataloader_over_train_32" in result["targets"]["checks"]
