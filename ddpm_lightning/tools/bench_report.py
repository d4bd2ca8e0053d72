"""The benchmark's text report (``python -m ddpm_lightning.tools.bench`` prints it)."""

from __future__ import annotations

from collections.abc import Mapping


def _fmt_rate(r: Mapping | None) -> str:
    if r is None:
        return "-"
    return f"{r['median']:.3g} [{r['min']:.3g}–{r['max']:.3g}]"


def report(result: dict) -> str:
    cfg, peak, flops = result["config"], result["peak_gflops"], result["flops"]
    params = f"{cfg['params']['ours']:,} params"
    if cfg["params"]["diffusers"]:
        params += f"; diffusers {cfg['params']['diffusers']:,}"
    gflop = "; ".join(
        f"{side} {f['model_forward'] / 1e9:.2f} / {f['model_train'] / 1e9:.2f} model"
        + (f", {f['executed_forward'] / 1e9:.2f} / {f['executed_train'] / 1e9:.2f} executed"
           if f["executed_train"] != f["model_train"] else "")
        for side, f in flops.items())
    lines = [
        (f"DDPM benchmark: model {cfg['model']} ({params}), batch {cfg['batch']}, "
         f"{cfg['threads']} threads, {cfg['device']} ({cfg['device_name']}); other processes "
         f"busy {_fmt_cpus(cfg['other_processes_cpus'])} CPUs"),
        (f"torch {cfg['torch']}, diffusers {cfg['diffusers'] or 'not installed'}; ours: "
         f"channels_last={cfg['ours']['channels_last']}, compile={cfg['ours']['compile']}; "
         f"{cfg['reps']} interleaved reps after {cfg['warmup']} warm-up: median [min–max]"),
        (f"dense peak now (GFLOP/s): fp32 matmul {peak['fp32_matmul']:.0f}, fp32 conv "
         f"{peak['fp32_conv']:.0f}, bf16 matmul {peak['bf16_matmul']:.0f}, bf16 conv "
         f"{peak['bf16_conv']:.0f}"),
        f"GFLOP per image, forward / train step: {gflop}",
        "(GFLOP/s below count the model FLOPs, so that their ratio is the speed ratio)",
        "",
    ]
    head = (f"{'precision':<11}{'what':<11}{'ours img/s':<24}{'diffusers img/s':<24}"
            f"{'ours/diff':<11}{'ours GFLOP/s (peak)':<21}{'diff GFLOP/s (peak)'}")
    lines += [head, "-" * len(head)]
    base = result["precision"].get("32", {}).get("diffusers", {}).get("train")
    for p, entry in result["precision"].items():
        for what in ("train", "forward"):
            o, d = entry["ours"][what], entry.get("diffusers", {}).get(what)
            speed = f"{entry['speedup'][what]:.3f}x" if d else "-"
            eff_o = f"{o['gflops']:.0f} ({o['fraction_of_peak']:.0%})"
            eff_d = f"{d['gflops']:.0f} ({d['fraction_of_peak']:.0%})" if d else "-"
            lines.append(f"{p:<11}{what:<11}{_fmt_rate(o['images_per_s']):<24}"
                         f"{_fmt_rate(d['images_per_s'] if d else None):<24}{speed:<11}"
                         f"{eff_o:<21}{eff_d}")
        if base is not None and p != "32":
            ratio = entry["ours"]["train"]["images_per_s"]["median"] / base["images_per_s"]["median"]
            lines.append(f"{'':<11}our {p} train step vs diffusers' fp32: {ratio:.3f}x")
    lines += ["", (f"sampler overhead (ours, EMA net, batch {cfg['batch']}): time per step / "
                   "bare forward, median [min–max] over rounds")]
    for p, entry in result["precision"].items():
        s = entry["sampler"]
        parts = [f"{n.upper()} {_fmt_ratio(s[n]['step_over_forward'])} (loop alone "
                 f"{s[n]['loop_over_forward']:.2%})" for n in ("ddpm", "ddim")]
        lines.append(f"  {p:<11}{s['rounds']} rounds of {s['steps']} steps, forward "
                     f"{s['forward_s']['median'] * 1e3:.1f} ms:  " + ",  ".join(parts))
    dl = result["dataloader"]
    ratios = ", ".join(f"{v:,.0f}x our {p} train step" for p, v in dl["over_train"].items())
    speed = dl["images_per_s"]
    lines += ["", (f"dataloader ({dl['dataset']}, batch {dl['batch']}, {dl['images_per_epoch']} "
                   f"images/epoch, on_after_batch_transfer included): {speed['median']:,.0f} "
                   f"img/s [{speed['min']:,.0f}–{speed['max']:,.0f}] = {ratios}")]
    tg = result["targets"]
    if tg["checks"]:
        scope = ("this run" if tg["paper_config"] else
                 "set for unet_cifar10 at batch 16 on the CPU; this run differs: information only")
        lines += ["", f"targets ({scope}):"]
        for key, t in tg["checks"].items():
            cmp = ">=" if t["higher_is_better"] else "<="
            lines.append(f"  {key:<44}{t['value']:>10.4g}  (target {cmp} {t['target']:g})  "
                         f"{'met' if t['met'] else 'NOT met'}")
    if result["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(lines)


def _fmt_cpus(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _fmt_ratio(r: Mapping) -> str:
    return f"{r['median']:.4f} [{r['min']:.4f}–{r['max']:.4f}]"
