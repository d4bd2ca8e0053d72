"""tools/gpu_check.py (make gpu-check): its no-GPU message, and its parts run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out",
                           str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "make gpu-check needs a CUDA GPU" in lines[0], proc.stderr
    assert not out.exists()


def test_sampling_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out),
                           "--parts", "sampling"]) == 0
    part = json.loads(out.read_text())["parts"]["sampling"]
    assert part["num_samples"] == 8
    assert part["conv_output_dtypes"] == ["torch.bfloat16"]  # the U-Net under bf16 autocast
    assert set(part["dpm_solver_256"]) == {"batch", "image_size", "steps_10", "steps_50"}
    for label in ("dpm_solver_sde_50", "ddpm_1000"):
        r = part[label]
        assert r["seconds"] > 0 and r["images_per_s"] == pytest.approx(8 / r["seconds"], rel=0.1)
    # (which sampler is faster is a timing, left out: a loaded CPU reverses 4 against 20 steps)


def test_the_peak_syncs_and_memory_parts_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out),
                           "--parts", "peak", "syncs", "memory_256"]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert parts["peak"]["bf16_tflops"] > 0 and parts["peak"]["fp32_tflops"] > 0
    assert parts["syncs"]["synchronizing_calls"] == 0 and parts["syncs"]["observable"] is False
    assert parts["memory_256"]["fp32"] == {"observable": False}  # CUDA's allocator only


def test_a_failing_part_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def broken(args, device):
        raise RuntimeError("no luck")

    monkeypatch.setitem(gpu_check.PARTS, "bench", broken)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out),
                           "--parts", "bench", "sampling"]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["bench"]["error"] == "RuntimeError: no luck"
    assert parts["sampling"]["ddpm_1000"]["images_per_s"] > 0


@pytest.mark.slow
def test_every_part_on_the_cpu(tmp_path, weights, monkeypatch):
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / weights.name).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(home))
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert not [k for k, v in parts.items() if "error" in v]
    assert parts["fit"]["steady_images_per_s"] > 0 and parts["fit"]["projected_800k_steps_h"] > 0
    assert 0 < parts["fit_fp16"]["last_grad_norm"] < 100
    assert parts["inception"]["images_per_s"] > 0
    eager = parts["bench"]["eager"]["rows"]["32"]
    assert eager["ours"]["train"]["images_per_s"] > 0
    assert eager["speedup_over_diffusers"]["train"] > 0
    assert parts["bench"]["channels_last_speedup_bf16-mixed"] > 0
    assert "bf16-mixed" in parts["bench"]["compiled_bf16"]["rows"]
