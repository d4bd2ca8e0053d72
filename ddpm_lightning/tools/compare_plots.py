"""The figures of ``compare``: metrics against step with one band per setting, the bound per
t-band, the schedules overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpm_lightning.metrics.intervals import normal_interval, t_interval


def figure(ncols: int, size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    return fig, list(np.atleast_1d(axes))


def save_figure(fig, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_t_bands(hist: dict, names: dict, path: Path) -> bool:
    """The bound per t-band at the last evaluation and the loss per quarter of t, per job."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = figure(2, (10, 3.8))
    drawn = False
    for job, name in names.items():
        h = hist[job]
        bands = sorted((int(k.removeprefix("eval/vb_band")), v[-1][1]) for k, v in h.items()
                       if k.startswith("eval/vb_band") and v)
        if bands:
            axes[0].plot(*zip(*bands), marker="o", label=name)
            drawn = True
        quarters = sorted((int(k.removeprefix("train/loss_q")), v[-1][1]) for k, v in h.items()
                          if k.startswith("train/loss_q") and v)
        if quarters:
            axes[1].plot(*zip(*quarters), marker="o", label=name)
            drawn = True
    axes[0].set(xlabel="t-band (strata of t, increasing)", ylabel="bits/dim in the band",
                title="the bound per t-band, last evaluation")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="quarter of t (0: t < T/4)", ylabel="loss",
                title="training loss per quarter of t, last window")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, axes, path)
    return drawn


def plot_schedules(jobs: dict[Path, str], path: Path) -> None:
    """Each job's ᾱ_t and log-SNR(t), overlaid."""
    from omegaconf import OmegaConf

    from ddpm_lightning.core.schedules import make_beta_schedule

    fig, axes = figure(2, (10, 3.8))
    for job, name in jobs.items():
        schedule = OmegaConf.to_container(OmegaConf.load(job / "config.yaml").schedule)
        schedule.pop("_target_", None)
        betas = np.asarray(make_beta_schedule(**schedule), dtype=np.float64)
        abar = np.cumprod(1 - betas)
        axes[0].plot(abar, label=name)
        axes[1].plot(np.log(abar / (1 - abar)), label=name)
    axes[0].set(xlabel="t", ylabel="ᾱ_t", title="ᾱ_t")
    axes[1].set(xlabel="t", ylabel="log SNR", title="log-SNR(t) = log ᾱ_t / (1 − ᾱ_t)")
    save_figure(fig, axes, path)


def band_series(series: list[dict[int, float]], errors: list[dict[int, float]]) -> list[tuple]:
    """(step, mean, low, high) of one metric for one setting at each step that its jobs
    share (``series``: each job's {step: value}): over 2+ seeds the mean and its 95% Student-t
    interval; for one job its value ± 1.96 × its standard error at that step (``errors``, the
    job's {step: error}; no band where it has none)."""
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    out = []
    for step in steps:
        values = [s[step] for s in series]
        if len(values) > 1:
            iv = t_interval(values)
        elif step in errors[0]:
            iv = normal_interval(values[0], errors[0][step])
        else:
            iv = {"mean": values[0], "low": None, "high": None}
        out.append((step, iv["mean"], iv["low"], iv["high"]))
    return out


def plot_bands(bands: dict[str, list[tuple]], path: Path, ylabel: str, title: str) -> bool:
    """One line per setting (the mean over its seeds) and its shaded 95% band."""
    if not any(bands.values()):
        return False
    fig, (ax,) = figure(1, (6.5, 4))
    for name, rows in bands.items():
        if not rows:
            continue
        steps, mean, low, high = zip(*rows)
        (line,) = ax.plot(steps, mean, marker="o", label=name)
        if all(v is not None for v in low):
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    save_figure(fig, [ax], path)
    return True
