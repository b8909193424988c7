"""The demo's three pictures, drawn with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from torch import Tensor

COLORS = {"baseline": "tab:gray", "attnres": "tab:blue"}


def loss_figure(val_loss: dict[str, list[list[tuple[int, float]]]], tokens_per_step: int, title: str) -> Figure:
    """Validation loss against training tokens: one curve per model and seed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curves in val_loss.items():
        for k, curve in enumerate(curves):
            ax.plot(
                [s * tokens_per_step for s, _ in curve],
                [loss for _, loss in curve],
                "o-",
                ms=3,
                lw=1,
                alpha=0.8,
                label=name if k == 0 else None,
                color=COLORS.get(name),
            )
    ax.set(xlabel="training tokens", ylabel="validation loss (nats / byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


PROFILE_PANELS = {
    "stream_read_rms": "RMS of the stream it reads",
    "output_rms": "RMS of its output",
    "grad_norm": "gradient norm of its parameters",
}


def depth_profile_figure(profile: dict[str, dict[str, list[float]]], block_size: int) -> Figure:
    """The paper's Figure 5: per sublayer, the magnitude of what it reads and writes and of its gradient, by model.
    `profile[model][panel]`; AttnRes block edges dotted."""
    fig, axes = plt.subplots(1, len(PROFILE_PANELS), figsize=(15, 4))
    for ax, (panel, label) in zip(axes, PROFILE_PANELS.items()):
        for name, values in profile.items():
            ax.plot(range(len(values[panel])), values[panel], "o-", ms=3, label=name, color=COLORS.get(name))
        depth = max(len(v[panel]) for v in profile.values())
        for edge in range(block_size, depth, block_size):
            ax.axvline(edge - 0.5, color="tab:blue", alpha=0.15, ls=":")
        ax.set_yscale("log")
        ax.set(xlabel="sublayer (attention, MLP, ...; the last read is the final norm's)", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("Depth profile after training")
    fig.tight_layout()
    return fig


def weights_figure(matrix: Tensor, site_names: list[str]) -> Figure:
    """Heatmap of the learned depth-attention weights: sites (rows) over sources (columns)."""
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * cols, 2.5 + 0.28 * rows))
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(
        range(cols), ["b0 (embed)", *(f"b{i}" for i in range(1, cols - 1)), "partial"], rotation=45, ha="right"
    )
    ax.set_yticks(range(rows), site_names)
    ax.set(xlabel="source", ylabel="site (reads the mix)", title="Learned depth-attention weights")
    fig.colorbar(image, ax=ax, label="mean softmax weight")
    fig.tight_layout()
    return fig
