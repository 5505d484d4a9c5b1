"""loss_curve.png of an `openelm train` run: training loss (raw and smoothed) and validation loss."""

from pathlib import Path
from typing import Optional

import numpy as np

from openelm_mlx.apps.train_data import EVAL_WINDOWS

SMOOTHING = 20  # steps in the running mean of the training loss


def plot_losses(state: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'openelm-mlx[bench]'): no loss curve drawn")
        return None
    train, val = np.array(state["train_loss"]), np.array(state["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(train) >= SMOOTHING:
        smooth = np.convolve(train[:, 1], np.ones(SMOOTHING) / SMOOTHING, mode="valid")
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(train[SMOOTHING - 1 :, 0], smooth, color="tab:blue", label=f"train (mean of {SMOOTHING} steps)")
    else:
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", label="train")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="tab:orange", label=f"validation (first {EVAL_WINDOWS} windows)")
    c = state["config"]
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats/token)",
        ylim=(None, min(8.5, train[:, 1].max() + 0.2)),
        title=f"OpenELM {c['layers']}L d{c['model_dim']}: batch {c['batch_size']}x{c['context']} tokens",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
