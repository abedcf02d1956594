"""SAE quality metrics: FVU, L0, dead / dense latents, the activation-frequency histogram.

    FVU       = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (normalised MSE; 0 is perfect)
    mean L0   = mean number of non-zero codes per input (<= k)
    dead      = latents that never fire on the evaluated inputs
    dense     = latents that fire on more than 10% of the inputs
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from saefe.manifest import write_json_atomic

DENSE_THRESHOLD = 0.10
REPORT_NAME = "report.json"
HIST_NAME = "activation_hist.png"


def iter_batches(vectors: np.ndarray | torch.Tensor, ids: np.ndarray | None, batch: int) -> Iterable[np.ndarray | torch.Tensor]:
    n = len(vectors) if ids is None else len(ids)
    for s in range(0, n, batch):
        if ids is None:
            yield vectors[s : s + batch]
        else:
            sel = ids[s : s + batch]
            if isinstance(vectors, torch.Tensor):
                yield vectors[torch.as_tensor(sel, device=vectors.device)]
            else:
                yield vectors[np.sort(sel)]


@torch.no_grad()
def evaluate(
    model: "torch.nn.Module",
    vectors: np.ndarray | torch.Tensor,
    ids: np.ndarray | None = None,
    batch: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``model`` (a TopKSAE) on ``vectors[ids]``; returns (metrics, firing counts)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    H = model.config.d_hidden
    counts = torch.zeros(H, dtype=torch.int64, device=device)
    se = 0.0
    n = 0
    s1 = None
    s2 = 0.0
    l0 = 0
    for xb in iter_batches(vectors, ids, batch):
        x = (xb if isinstance(xb, torch.Tensor) else torch.from_numpy(np.asarray(xb))).to(device).float()
        values, indices = model.encode(x)
        x_hat = model.decode(values, indices)
        se += float(((x - x_hat) ** 2).sum(dtype=torch.float64))
        s1 = x.sum(0, dtype=torch.float64) if s1 is None else s1 + x.sum(0, dtype=torch.float64)
        s2 += float((x.double() ** 2).sum())
        fired = values > 0
        l0 += int(fired.sum())
        counts += torch.bincount(indices[fired].flatten(), minlength=H)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no inputs to evaluate")
    total_var = s2 - float((s1 * s1).sum()) / n  # sum ||x - mean||^2
    freq = counts.double().cpu().numpy() / n
    metrics = {
        "n_inputs": n,
        "fvu": se / total_var if total_var > 0 else float("nan"),
        "mse": se / n,
        "mean_l0": l0 / n,
        "dead_count": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).double().mean()),
        "dense_count": int((freq > DENSE_THRESHOLD).sum()),
        "dense_fraction": float((freq > DENSE_THRESHOLD).mean()),
        "dense_threshold": DENSE_THRESHOLD,
        "d_hidden": H,
        "top_k": model.config.top_k,
    }
    return metrics, counts.cpu().numpy()


def activation_histogram(counts: np.ndarray, n_inputs: int, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency per latent (dead latents counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    freq = counts / max(n_inputs, 1)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(alive):
        lo = math.floor(np.log10(alive.min()))
        ax.hist(np.log10(alive), bins=np.linspace(lo, 0, 60), color="#3b6ea5")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="#c0392b", ls="--", lw=1, label="dense (10%)")
    ax.set_xlabel("log10 firing frequency (fraction of inputs)")
    ax.set_ylabel("latents")
    dead = int((counts == 0).sum())
    ax.set_title(f"{title} latents={len(counts)} dead={dead} ({dead / max(len(counts), 1):.1%})".strip())
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(out_dir: str | Path, metrics: dict[str, Any], counts: np.ndarray, extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    report = {"validation": metrics, **(extra or {})}
    write_json_atomic(out / REPORT_NAME, report)
    activation_histogram(counts, metrics["n_inputs"], out / HIST_NAME, title=out.name)
    return out / REPORT_NAME


def format_metrics(m: dict[str, Any]) -> str:
    return (
        f"FVU {m['fvu']:.4f}  mean L0 {m['mean_l0']:.1f}/{m['top_k']}  dead {m['dead_count']}/{m['d_hidden']} "
        f"({m['dead_fraction']:.2%})  dense {m['dense_count']} ({m['dense_fraction']:.2%})  on {m['n_inputs']} validation inputs"
    )


# --------------------------------------------------------------------------------------------
# planted data: the ground truth for quality benchmarks and tests


def planted_data(
    n: int, d: int, n_atoms: int, active: int, noise: float = 0.01, seed: int = 0, normalise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors that are sparse non-negative combinations of known unit atoms plus noise.

    Returns (vectors (n, d) float32, atoms (n_atoms, d) unit rows). Each vector mixes ``active``
    distinct atoms with coefficients uniform in [0.5, 1.5], adds Gaussian noise of per-dim std
    ``noise / sqrt(d)``, then (by default) is L2-normalised like an embedding store row.
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    # distinct atoms per row without an (n, n_atoms) permutation: argpartition of random keys
    idx = np.concatenate(
        [np.argpartition(rng.random((min(8192, n - s), n_atoms), dtype=np.float32), active, axis=1)[:, :active] for s in range(0, n, 8192)]
    ) if n else np.zeros((0, active), dtype=np.int64)
    coef = rng.uniform(0.5, 1.5, size=(n, active)).astype(np.float32)
    x = np.einsum("na,nad->nd", coef, atoms[idx], optimize=True)
    x += rng.standard_normal((n, d)).astype(np.float32) * (noise / math.sqrt(d))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), atoms


def atoms_recovered(directions: torch.Tensor | np.ndarray, atoms: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of atoms matched by some decoder column with cosine > threshold.

    ``directions`` is (d_emb, d_hidden) (decoder columns = feature directions)."""
    w = torch.as_tensor(np.asarray(directions.detach().cpu() if isinstance(directions, torch.Tensor) else directions), dtype=torch.float32)
    w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-8)
    a = torch.as_tensor(atoms, dtype=torch.float32)
    best = torch.full((a.shape[0],), -1.0)
    for s in range(0, w.shape[1], 8192):
        best = torch.maximum(best, (a @ w[:, s : s + 8192]).max(dim=1).values)
    return float((best > threshold).float().mean())
