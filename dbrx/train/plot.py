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
    """Write RUN_DIR/loss.png, RUN_DIR/expert_load.png and (with eval.icl_tasks) RUN_DIR/icl.png; returns the files
    written ([] without matplotlib)."""
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
    if "lb_per_layer" in steps[-1]:  # each layer's E * sum_e f_le * P_le: 1.0 = balanced
        with_layers = [r for r in steps if "lb_per_layer" in r]
        for layer in range(len(with_layers[-1]["lb_per_layer"])):
            ax2.plot([r["step"] for r in with_layers], [r["lb_per_layer"][layer] for r in with_layers], lw=1,
                     label=f"layer {layer}")
        ax2.axhline(1.0, color="black", lw=1, ls=":", label="balanced (1.0)")
        ax2.set_ylabel("E * sum_e f_e * P_e per layer")
        ax2.legend(fontsize=7, loc="upper right")
    else:  # a run from before per-layer logging: the loss itself
        ax2.plot(x, [r["lb_loss"] for r in steps], lw=1, color="tab:green")
        ax2.set_ylabel("load-balancing loss")
    ax2.set_xlabel("step")
    ax2.set_title("load balance per layer")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    with_load = [r for r in steps if "expert_load" in r]
    if with_load:
        from matplotlib.colors import TwoSlopeNorm

        matrix = with_load[-1]["expert_load"]  # (L, E) shares of routed rows
        n_experts = len(matrix[0])
        rel = [[share * n_experts for share in row] for row in matrix]  # 1.0 = the balanced share 1/E
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        top = max(2.0, max(max(row) for row in rel))
        im = ax1.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
        ax1.set_xlabel("expert")
        ax1.set_ylabel("layer")
        ax1.set_yticks(range(len(rel)))
        ax1.set_xticks(range(n_experts))
        ax1.set_title(f"load / balanced share (1/{n_experts}), step {with_load[-1]['step']}\n(white = balanced, "
                      f"blue = starved)", fontsize=9)
        fig.colorbar(im, ax=ax1)
        n_layers = len(steps[0]["expert_load_max"])
        for layer in range(n_layers):
            line = ax2.plot(x, [r["expert_load_min"][layer] * n_experts for r in steps], lw=1,
                            label=f"layer {layer}")
            ax2.plot(x, [r["expert_load_max"][layer] * n_experts for r in steps], lw=1, ls="--",
                     color=line[0].get_color())
        ax2.axhline(1.0, color="black", lw=1.2, label="balanced")
        ax2.axhline(0.25, color="tab:red", lw=1, ls=":", label="1/4 of balanced")
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("step")
        ax2.set_ylabel("share x E (min solid, max dashed)")
        ax2.set_title("least and most loaded expert per layer")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")

    icl = [r for r in records if r.get("event") == "eval" and "icl/overall" in r]  # eval.icl_tasks' scores
    if icl:
        fig, ax = plt.subplots(figsize=(7, 4))
        keys = sorted({k for r in icl for k in r if k.startswith("icl/") and not k.startswith("icl/task/")} -
                      {"icl/overall"}) + ["icl/overall"]
        for key in keys:
            pts = [(r["step"], r[key]) for r in icl if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, lw=2.5 if key == "icl/overall" else 1,
                        color="black" if key == "icl/overall" else None, label=key.removeprefix("icl/"))
        ax.axhline(0.0, color="gray", lw=1, ls=":")
        ax.set_xlabel("step")
        ax.set_ylabel("rescaled accuracy (0 = chance)")
        ax.set_title(f"ICL tasks (Gauntlet scores): {run_dir.name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "icl.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "icl.png")
    return written


__all__ = ["plot_run"]
