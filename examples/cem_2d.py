"""CEM and DCEM on a 2-D function with three Gaussian wells.

The objective of the reference notebook (Amos & Yarats): wells of depth 1, 0.5 and 1 at
(0, 0), (1, 1) and (-2, 2), tilted by ``0.15 x cos(y)``, on the box [-3, 1] x [-1, 3]. Both
methods start from one wide Gaussian in the middle of the box. CEM refits it to the k best
samples, DCEM to the soft elite weights ``lml(scores, k, tau)``: differentiable.

Figures, written to ``--out``:
  cem_2d.png              the samples of each iteration (lighter to darker), the mean's path,
                          and the std of the sampling Gaussian per iteration
  cem_2d_temperature.png  the soft elite weights of one set of samples for a few temperatures,
                          next to CEM's hard elites (``topk_mask``)

Run:  python examples/cem_2d.py [--out FOLDER] [--device cpu|cuda] [--tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import dcem  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", type=Path, default=Path("."), help="folder for the figures")
p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
p.add_argument("--tiny", action="store_true", help="smallest sizes (a few seconds)")
args = p.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
dev = torch.device(args.device)
n_sample, n_elite, n_iter, n_grid = (40, 6, 6, 101) if args.tiny else (100, 10, 10, 401)
TAU = 1.0  # DCEM's temperature (scores are standardized per iteration, so it is scale-free)

# --- the objective: (..., 2) -> (...), so (B, N, 2) samples give (B, N) costs -------------------
WELLS = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 1.0], [1.0, -2.0, 2.0]], device=dev)
LB, UB = torch.tensor([-3.0, -1.0], device=dev), torch.tensor([1.0, 3.0], device=dev)


def f(x: torch.Tensor) -> torch.Tensor:
    depth, cx, cy = WELLS.unbind(-1)
    X, Y = x[..., :1], x[..., 1:]  # (..., 1) against the (3,) wells
    wells = (depth * torch.exp(-((X - cx) ** 2) - (Y - cy) ** 2)).sum(-1)
    return -wells + 0.15 * x[..., 0] * torch.cos(x[..., 1])


# The true global minimum, by brute force on a dense grid.
side = torch.linspace(0.0, 4.0, n_grid, device=dev)
grid = torch.stack(torch.meshgrid(side - 3, side - 1, indexing="xy"), -1)  # (n_grid, n_grid, 2)
Z = f(grid)
grid_min, grid_argmin = float(Z.min()), grid.reshape(-1, 2)[Z.argmin()].tolist()

# --- run both methods, recording every iteration through the callback -------------------------
init_mu, init_sigma = torch.tensor([-1.0, 1.0], device=dev), 1.0
runs: dict[str, list[dcem.IterationInfo]] = {}
for name in ("CEM", "DCEM"):
    infos: list[dcem.IterationInfo] = []
    gen = torch.Generator(device=dev).manual_seed(0)  # same noise for both methods
    kw = dict(n_sample=n_sample, n_elite=n_elite, n_iter=n_iter, lb=LB, ub=UB, generator=gen)
    if name == "CEM":
        mu = dcem.cem(f, init_mu, init_sigma, callback=infos.append, **kw)
    else:
        mu = dcem.dcem(f, init_mu, init_sigma, tau=TAU, callback=infos.append, **kw)
    runs[name] = infos
    std = infos[-1].sigma[0]
    print(f"{name:<4} final mean ({mu[0]:+.4f}, {mu[1]:+.4f})  cost {float(f(mu)):.5f}  "
          f"grid minimum {grid_min:.5f} at ({grid_argmin[0]:+.3f}, {grid_argmin[1]:+.3f})  "
          f"final std ({std[0]:.1e}, {std[1]:.1e})")  # fmt: skip

# --- figure 1: samples per iteration and the mean's path ---------------------------------------
GX, GY, GZ = grid[..., 0].cpu(), grid[..., 1].cpu(), Z.cpu()
oranges = plt.get_cmap("Oranges")  # iteration i (from 0) gets shades[i], lighter to darker
shades = [oranges(0.25 + 0.75 * i / max(1, n_iter - 1)) for i in range(n_iter)]


def background(ax: plt.Axes, title: str = "", alpha: float = 1.0):
    cs = ax.contourf(GX, GY, GZ, levels=20, cmap="Blues_r", alpha=alpha)
    ax.contour(GX, GY, GZ, levels=20, colors="k", linewidths=0.2)
    ax.plot(*grid_argmin, "*", ms=15, mfc="none", mec="gold", mew=2, zorder=5, label="grid min.")
    ax.set(title=title, xlabel="$x_1$", ylabel="$x_2$", aspect="equal")
    return cs


fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), width_ratios=[1, 1, 0.75], layout="constrained")
for ax, (name, infos) in zip(axes[:2], runs.items(), strict=True):
    cs = background(ax, f"{name}: {n_sample} samples, {n_elite} elites, {n_iter} iterations")
    for info in infos:
        ax.scatter(*info.samples[0].cpu().T, s=9, color=shades[info.iteration], lw=0)
    path = torch.stack([init_mu] + [info.mu[0] for info in infos]).cpu()
    ax.plot(path[:, 0], path[:, 1], "-o", color="crimson", ms=4, lw=1.5, label="mean")
    ax.plot(*path[0], "s", color="crimson", ms=8, mec="k", label="initial mean")
    ax.legend(loc="upper right", fontsize=9)
    # the spread of the sampling Gaussian: CEM's collapses faster than DCEM's soft refit
    sigma = torch.stack([torch.full((2,), init_sigma)] + [i.sigma[0].cpu() for i in infos])
    color = "tab:blue" if name == "CEM" else "tab:red"
    axes[2].semilogy(sigma[:, 0], "-o", color=color, ms=4, label=f"{name}, $\\sigma_1$")
    axes[2].semilogy(sigma[:, 1], "--s", color=color, ms=4, label=f"{name}, $\\sigma_2$")
axes[2].set(title="Std of the sampling Gaussian", xlabel="iteration (0 = initial)", ylabel="std")
axes[2].grid(alpha=0.3, which="both")
axes[2].legend(fontsize=9)
fig.colorbar(cs, ax=axes[:2], shrink=0.8, label="f(x)")
iters = plt.cm.ScalarMappable(plt.Normalize(0.5, n_iter + 0.5), ListedColormap(shades))
fig.colorbar(iters, ax=axes[:2], location="bottom", shrink=0.5, aspect=40,
             ticks=range(1, n_iter + 1), label="iteration (lighter = earlier)")  # fmt: skip
fig.savefig(args.out / "cem_2d.png", dpi=120)
plt.close(fig)

# --- figure 2: soft elites of one set of samples at several temperatures -----------------------
# DCEM's scores: the costs standardized over the samples, negated (higher is better); its
# elite weights are lml(scores, k, tau). tau -> 0 gives the hard top-k that CEM keeps.
first = runs["DCEM"][0]  # DCEM's first iteration
x, v = first.samples[0], first.costs[0]
z = -(v - v.mean()) / v.std()
same = float((dcem.lml(z, n_elite, TAU) - first.weights[0]).abs().max())
print(f"lml(standardized scores, k, tau={TAU}) matches DCEM's weights: max diff {same:.1e}")
panels = [("hard top-k (CEM)", dcem.topk_mask(z, n_elite))]
panels += [(f"soft top-k (DCEM), tau = {t:g}", dcem.lml(z, n_elite, t)) for t in (0.1, 1.0, 10.0)]

fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), layout="constrained")
for ax, (name, w) in zip(axes, panels, strict=True):
    background(ax, name.replace("tau", "τ"), alpha=0.55)
    order = w.argsort().cpu()  # heaviest on top
    xs, ws = x.cpu()[order], w.cpu()[order]
    sc = ax.scatter(xs[:, 0], xs[:, 1], c=ws, cmap="magma_r", vmin=0, vmax=1, s=14 + 60 * ws,
                    edgecolors="k", linewidths=0.3)  # fmt: skip
    print(f"{name:<29} weights sum {w.sum():.4f}  max {w.max():.3f}  min {w.min():.3f}")
fig.colorbar(sc, ax=axes, shrink=0.85, label=f"elite weight (sum = k = {n_elite})")
fig.suptitle(f"Elite weights of one set of samples (DCEM's first iteration, k = {n_elite} of "
             f"N = {n_sample}): lower τ, closer to CEM's hard elites")  # fmt: skip
fig.savefig(args.out / "cem_2d_temperature.png", dpi=110)
plt.close(fig)
print(f"wrote {args.out / 'cem_2d.png'} and {args.out / 'cem_2d_temperature.png'}")
