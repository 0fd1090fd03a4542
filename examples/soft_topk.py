"""The soft top-k (LML projection) on its own: its limit tau -> 0 and its implicit gradient.

``dcem.lml(x, k, tau)`` returns weights ``y_i = sigmoid((x_i + nu) / tau)`` in [0, 1] that
sum to k (``nu`` is found by a root find). As tau -> 0 they become the hard top-k indicator
``dcem.topk_mask(x, k)``: the error decays like ``sigmoid(-gap / (2 tau))``, where ``gap``
is the difference between the k-th and the (k+1)-th largest scores. The backward pass is
the closed-form implicit gradient; here it is checked against central finite differences.

Figure, written to ``--out``:
  soft_topk.png  (left) the weights of one random vector for a few tau and the hard top-k;
                 (right) max |lml - topk_mask| against tau

Run:  python examples/soft_topk.py [--out FOLDER] [--device cpu|cuda] [--tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import dcem  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", type=Path, default=Path("."), help="folder for the figure")
p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
p.add_argument("--tiny", action="store_true", help="smallest sizes (a few seconds)")
args = p.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
dev = torch.device(args.device)
n, k, n_tau = (8, 3, 9) if args.tiny else (12, 4, 61)

# One random score vector, in float64 (the finite differences below need the precision).
gen = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(n, generator=gen, device=dev, dtype=torch.float64)
hard = dcem.topk_mask(x, k)
top = x.sort(descending=True).values
gap = float(top[k - 1] - top[k])  # k-th largest minus (k+1)-th largest score
print(f"n = {n}, k = {k}, gap between the k-th and (k+1)-th scores = {gap:.4f}")

# --- tau -> 0: the soft top-k approaches the hard one ----------------------------------------
taus = torch.logspace(-2, 1, n_tau).tolist()  # 0.01 ... 10
err = []
for tau in taus:
    y = dcem.lml(x, k, tau)
    assert abs(float(y.sum()) - k) < 1e-9  # the constraint holds at every temperature
    err.append(float((y - hard).abs().max()))
guide = [float(torch.sigmoid(torch.tensor(-gap / (2 * t)))) for t in taus]
print(f"max |lml - topk_mask| at tau = {taus[0]:g}: {err[0]:.2e} (sigmoid(-gap / (2 tau)) "
      f"= {guide[0]:.2e});  at tau = {taus[-1]:g}: {err[-1]:.3f}")  # fmt: skip

# --- the implicit gradient against central finite differences --------------------------------
c = torch.randn(n, generator=gen, device=dev, dtype=torch.float64)  # a random linear loss


def loss(z: torch.Tensor, tau: float) -> torch.Tensor:
    return (c * dcem.lml(z, k, tau)).sum()


h = 1e-5  # error of central differences: O(h^2) truncation + O(1e-16 / h) rounding
for tau in (1.0, 0.1):
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xg, tau), xg)
    eye = torch.eye(n, device=dev, dtype=torch.float64)
    fd = torch.stack([(loss(x + h * e, tau) - loss(x - h * e, tau)) / (2 * h) for e in eye])
    print(f"tau = {tau:g}: implicit gradient vs central differences (h = {h:g}): "
          f"max abs diff {float((grad - fd).abs().max()):.1e}  (max |grad| "
          f"{float(grad.abs().max()):.3f})")  # fmt: skip

# --- figure -----------------------------------------------------------------------------------
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
xc = x.cpu()
s = torch.linspace(float(xc.min()) - 0.3, float(xc.max()) + 0.3, 400, dtype=torch.float64)
shown = (1.0, 0.3, 0.1, 0.03)
colors = plt.get_cmap("viridis")([0.85, 0.6, 0.35, 0.1])
for tau, color in zip(shown, colors, strict=True):
    y = dcem.lml(x, k, tau).cpu()
    # every weight lies on one sigmoid of the score: recover nu from the least saturated entry
    j = int((y - 0.5).abs().argmin())
    nu = tau * float(torch.logit(y[j])) - float(xc[j])
    ax.plot(s, torch.sigmoid((s + nu) / tau), color=color, lw=1, alpha=0.7)
    ax.plot(xc, y, "o", color=color, ms=6, zorder=3, label=f"lml, τ = {tau:g}")
thr = 0.5 * float(top[k - 1] + top[k])
ax.plot(s, (s > thr).double(), "k--", lw=1)
ax.plot(xc, hard.cpu(), "kx", ms=10, mew=2, zorder=2, label="topk_mask (hard)")
ax.set(xlabel="score $x_i$", ylabel="weight $y_i$",
       title=f"Soft top-k of {n} random scores, k = {k}: weights sum to k")  # fmt: skip
ax.legend(loc="upper left", fontsize=9)
ax.grid(alpha=0.3)

bx.loglog(taus, err, "o-", ms=3, label="max$_i$ |lml(x, k, τ) − topk_mask(x, k)|")
bx.loglog(taus, guide, "k--", lw=1, label=f"sigmoid(−gap / 2τ), gap = {gap:.3f}")
for i, (tau, color) in enumerate(zip(shown, colors, strict=True)):
    bx.axvline(tau, color=color, lw=1, alpha=0.6, label=None if i else "the τ of the left panel")
bx.set(xlabel="temperature τ", ylabel="max deviation from hard top-k",
       title="τ → 0 recovers the hard top-k")  # fmt: skip
bx.legend(loc="lower right", fontsize=9)
bx.grid(alpha=0.3, which="both")
fig.savefig(args.out / "soft_topk.png", dpi=120)
plt.close(fig)
print(f"wrote {args.out / 'soft_topk.png'}")
