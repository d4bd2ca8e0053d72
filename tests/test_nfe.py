"""python -m ddpm_lightning.tools.nfe: FID against NFE for several samplers, on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.core.inference import prepare
from ddpm_lightning.metrics import fid as fidlib
from ddpm_lightning.tools import nfe


@pytest.fixture(scope="module")
def study(tiny_ckpt, weights, tmp_path_factory):
    """One study (three samplers at 2 and 5 NFE, DDPM at 50) shared by the tests below; ``run``
    runs it again in the same folder, with extra arguments."""
    tmp = tmp_path_factory.mktemp("nfe")
    out = tmp / "study"

    def run(*extra):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DDPM_FID_CACHE", str(tmp / "stats"))
            nfe.main([str(tiny_ckpt), "--out", str(out), "--n", "6", "--batch-size", "4",
                      "--nfe", "2", "5", "--long-nfe", "50", "--grid", "3",
                      "--samplers", "ddpm_small", "dpm_sde", "ddim0",
                      "--ref-max-images", "16", "--weights-path", str(weights), "--no-progress",
                      *extra])
        return json.loads((out / "results.json").read_text())

    return out, run, run()


def test_table_plot_grids_and_reuse(study, monkeypatch):
    out, run, results = study
    entries = results["entries"]
    assert sorted(entries) == sorted(["ddpm_small@2", "dpm_sde@2", "ddim0@2", "ddpm_small@5",
                                      "dpm_sde@5", "ddim0@5", "ddpm_small@50"])
    for key, e in entries.items():
        assert f"{e['sampler']}@{e['nfe']}" == key and e["n"] == 6
        assert np.isfinite(e["fid"]) and e["fid"] > 0 and e["ms_per_image_nfe"] > 0
        assert e["speckle"] in [k / 6 for k in range(7)]  # a share of the 6 samples
    table = (out / "results.md").read_text()
    assert "| sampler | 2 NFE | 5 NFE | 50 NFE |" in table
    ddim_row = next(line for line in table.splitlines() if line.startswith("| ddim"))
    assert ddim_row.endswith("| – |")  # ddim is not run at the long NFE
    assert f"({entries['ddim0@2']['speckle']:.0%})" in ddim_row
    for name in ("fid_vs_nfe.png", "grids.png", "grid_ddpm_small.png", "grid_ddim0.png"):
        assert Image.open(out / name).size[0] > 0
    # one 16×16 row (plus padding) per NFE: ddpm has three, the others two
    assert Image.open(out / "grid_ddpm_small.png").height == 3 * Image.open(
        out / "grid_ddim0.png").height // 2

    # An identical second run reuses every entry: no sampling, no FID.
    monkeypatch.setattr(fidlib, "compute_fid", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr("ddpm_lightning.core.generate.generate",
                        lambda *a, **k: pytest.fail("sampled again"))
    again = run()
    assert again["entries"] == entries


def test_same_x_T_for_every_sampler(study):
    """At 2 steps the first SDE-DPM-Solver++ step is the DDPM step with σ² = β̃ and both end
    at x̂₀, so from the same x_T (and z) the two samplers give the same images."""
    out, _, _ = study
    a = np.asarray(Image.open(out / "rows" / "ddpm_small@2.png"), dtype=np.int16)
    b = np.asarray(Image.open(out / "rows" / "dpm_sde@2.png"), dtype=np.int16)
    c = np.asarray(Image.open(out / "rows" / "ddim0@2.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # round-off may move a pixel by one level
    assert np.abs(a - c).max() > 10  # a deterministic sampler is not the same chain


def test_another_study_in_the_same_folder_is_refused(study, capsys):
    out, run, _ = study
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit) as exc:
        run("--seed", "1")
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=0" in err[0] and "--out" in err[0]
    assert (out / "results.json").read_text() == before  # kept


def test_markdown_table_marks_the_best_of_each_column():
    entries = {"ddpm_small@10": {"sampler": "ddpm_small", "nfe": 10, "fid": 30.0},
               "dpm_sde@10": {"sampler": "dpm_sde", "nfe": 10, "fid": 20.0},
               "ddpm_small@20": {"sampler": "ddpm_small", "nfe": 20, "fid": 15.0}}
    table = nfe.markdown_table(entries, ["ddpm_small", "dpm_sde"], [10, 20]).splitlines()
    assert table[2] == f"| {nfe.SAMPLERS['ddpm_small'][0]} | 30.0 | **15.0** |"
    assert table[3] == f"| {nfe.SAMPLERS['dpm_sde'][0]} | **20.0** | – |"


def test_plan_runs_short_nfe_first_and_ddpm_alone_at_the_long_nfe():
    assert nfe.plan(["ddpm_small", "dpm_sde"], [20, 10], 1000) == [
        ("ddpm_small", 10), ("dpm_sde", 10), ("ddpm_small", 20), ("dpm_sde", 20),
        ("ddpm_small", 1000)]


@pytest.mark.parametrize("bf16", [False, True])
def test_inference_net_gives_the_network_output(bf16):
    from ddpm_lightning.core.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
               image_size=16, dropout=0.0).eval()
    with torch.no_grad():  # the last layer starts at zero: give every weight a value
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 40])
    with torch.inference_mode():
        want = net(x, t)
        got = prepare(net, channels_last=True, bf16=bf16)(x, t)
    assert got.dtype == torch.float32 and got.is_contiguous()
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < (3e-2 if bf16 else 1e-5)
    assert err > 1e-4 if bf16 else True  # bf16 really ran: its round-off shows


def test_speckle_share_counts_samples_rougher_than_every_real_image():
    from ddpm_lightning.metrics.speckle import speckle_share, speckle_threshold, total_variation

    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8)
    real = ramp.view(1, 1, 1, 16).expand(10, 1, 16, 16).clone()  # smooth images
    real[:, :, :, ::5] = 0  # a few edges, differing between images
    real[3, :, 2] = 255
    threshold = speckle_threshold(real)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8)
    samples = torch.cat([real[:6], noisy])
    assert speckle_share(samples, threshold) == pytest.approx(0.4)
    as_float = real.float() / 127.5 - 1
    assert torch.allclose(total_variation(as_float), total_variation(real))

