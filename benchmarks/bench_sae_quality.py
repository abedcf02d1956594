"""SAE quality on planted data: are the known atoms recovered? One table, all option sets.

Vectors are sparse non-negative combinations of known unit atoms plus noise, L2-normalised
like an embedding store's rows (``saefe.sae.metrics.planted_data``). The same data is written
to a temporary store and an SAE is trained on it through ``train_sae`` for each option set:

    baseline    the seed: no pre-encoder bias, free decoder norms, no AuxK
    +pre-bias   input centring on a learned pre-encoder bias (init: data mean)
    +unit-norm  unit-norm decoder columns
    +auxk       AuxK loss on dead latents
    all         all three
    default     TrainConfig's defaults (what `saefe train-sae` does)

Reported per set: atoms recovered (some decoder column with cosine > 0.9), FVU and mean L0 on
the validation split, dead latents (never fire on validation), dense latents, seconds. A
reference line gives the FVU of the ground truth itself as a top-k SAE (encoder = decoder = the
planted atoms, best single threshold and decoder scale): about 0.19 at k 16 and 0.17 at k 32 on
the default data, because a linear encoder cannot undo the interference of 2048 random atoms in
256-d, so it misses about a quarter of the true atoms in its top 16. Training from that oracle
also ends at FVU ~0.19 (k 16) / ~0.17 (k 32), so the FVU <= 0.05 target is below what any top-k
SAE with a linear encoder reaches on this data; atoms recovered and dead latents are the
meaningful targets here.

    python benchmarks/bench_sae_quality.py             # 2048 atoms in 256-d, 16 active (CPU: a few minutes)
    python benchmarks/bench_sae_quality.py --sets baseline default --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saefe.manifest import EncoderInfo  # noqa: E402
from saefe.sae.model import SAEConfig, TopKSAE  # noqa: E402
from saefe.sae.metrics import atoms_recovered, evaluate, planted_data  # noqa: E402
from saefe.sae.train import TrainConfig, train_sae  # noqa: E402
from saefe.ingest.store import write_store  # noqa: E402

SETS = {
    "baseline": dict(pre_bias=False, unit_norm=False, auxk=False),
    "+pre-bias": dict(pre_bias=True, unit_norm=False, auxk=False),
    "+unit-norm": dict(pre_bias=False, unit_norm=True, auxk=False),
    "+auxk": dict(pre_bias=False, unit_norm=False, auxk=True),
    "all": dict(pre_bias=True, unit_norm=True, auxk=True),
    "default": {},
}


@torch.no_grad()
def oracle_fvu(x: np.ndarray, atoms: np.ndarray, k: int, n_eval: int = 5000) -> tuple[float, float, float]:
    """FVU of the ground truth as a top-k SAE: encoder = decoder = the planted atoms.

    The encoder bias (one threshold for all latents) and the decoder scale are grid-searched,
    so this is the best a top-k SAE whose dictionary is exactly right does. A linear encoder
    cannot undo the interference between 2048 random atoms in 256-d (|cos| ~ 1/16 each), so
    it picks wrong atoms and misweights right ones; training cannot beat this by much.
    Returns (fvu, threshold, scale)."""
    a = torch.from_numpy(atoms)
    sae = TopKSAE(SAEConfig(d_emb=a.shape[1], d_hidden=a.shape[0], top_k=k, up_proj_bias=True, pre_bias=False))
    sae.up_proj.weight.copy_(a)
    xs = x[: min(n_eval, len(x))]
    best = (float("inf"), 0.0, 1.0)
    for t in np.linspace(0.0, 0.2, 11):
        for scale in (0.9, 1.0, 1.1, 1.2):
            sae.up_proj.bias.fill_(-float(t))
            sae.down_proj.weight.T.copy_(a * scale)
            fvu = evaluate(sae, xs, device="cpu")[0]["fvu"]
            best = min(best, (fvu, float(t), scale))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60000, help="vectors (10%% validation)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--atoms", type=int, default=2048)
    p.add_argument("--active", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.05, help="noise norm relative to a unit atom")
    p.add_argument("--d-hidden", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="0 = TrainConfig's rule")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", nargs="+", default=["baseline", "+pre-bias", "+unit-norm", "+auxk", "all"], choices=list(SETS))
    a = p.parse_args(argv)

    t0 = time.time()
    x, atoms = planted_data(a.n, a.dim, a.atoms, a.active, noise=a.noise, seed=a.seed)
    info = EncoderInfo("planted/synthetic", a.dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_store(Path(tmp) / "index", x, None, info)
        for name in a.sets:
            cfg = TrainConfig(
                index_dir=str(Path(tmp) / "index"), out_dir=str(Path(tmp) / name.strip("+")), d_hidden=a.d_hidden, k=a.k,
                epochs=a.epochs, batch_size=a.batch, lr=a.lr or None, seed=a.seed, device=a.device, progress=False, **SETS[name],
            )
            t = time.time()
            res = train_sae(cfg)
            sae = TopKSAE.from_pretrained(cfg.out_dir)
            m = res.metrics
            opts = [o for o in ("pre_bias", "unit_norm", "auxk") if getattr(cfg, o)]
            rows.append((name, "+".join(opts) or "-", atoms_recovered(sae.directions, atoms), m["fvu"], m["mean_l0"], m["dead_fraction"], m["dense_fraction"], res.steps, time.time() - t))
            print(f"  {name}: done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    lr = a.lr or TrainConfig.__dataclass_fields__["lr"].default
    print(
        f"planted: n {a.n} (train {a.n - round(0.1 * a.n)}), {a.atoms} unit atoms in {a.dim}-d, {a.active} active (coef U[0.5,1.5]), "
        f"noise {a.noise}; SAE d_hidden {a.d_hidden}, k {a.k}, {a.epochs} epochs x batch {a.batch}, lr {lr or 'auto'}; device {dev}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| set | options | atoms recovered (cos>0.9) | FVU | mean L0 | dead | dense | steps | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, opts, rec, fvu, l0, dead, dense, steps, sec in rows:
        print(f"| {name} | {opts} | {rec:.1%} | {fvu:.4f} | {l0:.1f} | {dead:.2%} | {dense:.2%} | {steps} | {sec:.0f} |")
    ofvu, othr, oscale = oracle_fvu(x, atoms, a.k)
    print(
        f"reference: the true atoms as a top-k SAE (encoder = decoder = atoms, threshold {othr:.2f}, scale {oscale:.1f}), "
        f"k {a.k}: FVU {ofvu:.4f}"
    )
    print(f"target: >= 90% recovered, FVU <= 0.05, dead <= 1%; total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
