"""Pictures of a training run from its metrics.jsonl: the loss curve and the experts' load (matplotlib, Agg)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .metrics import read_metrics


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _last_per_step(records: list[dict]) -> list[dict]:
    """Step records, keeping the last one per step (a resumed run repeats the steps after its checkpoint)."""
    by_step = {r["step"]: r for r in records if "event" not in r and "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write RUN_DIR/loss.png and RUN_DIR/expert_load.png; returns the files written ([] without matplotlib)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = _last_per_step(records)
    if not steps:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training steps")
    plt = _pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: no plots (`pip install matplotlib`)", stacklevel=2)
        return []
    written = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["step"] for r in steps]
    ax1.plot(x, [r["loss"] for r in steps], label="loss", lw=1)
    ax1.plot(x, [r["lm_loss"] for r in steps], label="LM loss", lw=1)
    evals = [r for r in records if r.get("event") == "eval"]
    for key in sorted({k for r in evals for k in r if k.startswith("eval_loss_")}):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax1.plot(*zip(*pts), "o-", label=f"held-out {key.removeprefix('eval_loss_')}", ms=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats)")
    ax1.set_title(f"loss: {run_dir.name}")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(x, [r["lb_loss"] for r in steps], lw=1, color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("load-balancing loss (top_k = balanced)")
    ax2.set_title("load balancing")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    with_load = [r for r in steps if "expert_load" in r]
    if with_load:
        matrix = with_load[-1]["expert_load"]  # (L, E)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        im = ax1.imshow(matrix, aspect="auto", cmap="viridis")
        ax1.set_xlabel("expert")
        ax1.set_ylabel("layer")
        ax1.set_yticks(range(len(matrix)))
        ax1.set_title(f"share of routed tokens, step {with_load[-1]['step']}")
        fig.colorbar(im, ax=ax1)
        n_layers = len(steps[0]["expert_load_max"])
        for layer in range(n_layers):
            line = ax2.plot(x, [r["expert_load_max"][layer] for r in steps], lw=1, label=f"layer {layer} max")
            ax2.plot(x, [r["expert_load_min"][layer] for r in steps], lw=1, ls="--", color=line[0].get_color())
        n_experts = len(matrix[0])
        ax2.axhline(1 / n_experts, color="black", lw=0.8, label="balanced")
        ax2.set_xlabel("step")
        ax2.set_ylabel("share (max solid, min dashed)")
        ax2.set_title("expert load per layer")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")
    return written


__all__ = ["plot_run"]
