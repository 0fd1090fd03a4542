"""DCEM as a layer: learn the parameters of an objective by backpropagating through its argmin.

``dcem.dcem(f, init_mu, ...)`` estimates ``argmin_y f(y)`` differentiably in whatever ``f``
closes over, so a loss on the solution trains ``f`` with Adam. Part 1: three Gaussian wells
with learnable centres and depths, trained until DCEM's argmin (which starts in another well)
sits on a target point. Part 2: an energy MLP ``E(x, y)`` trained on a batch of problems so
that ``argmin_y E(x, y)`` fits ``y*(x) = x sin x`` (a short run of the paper's §5.1).

Run: ``python examples/dcem_layer.py [--out DIR] [--device cpu|cuda] [--tiny]``; it writes
``dcem_layer_loss.png``, ``dcem_layer.gif`` and ``dcem_layer_batch.png`` to DIR.
"""

import argparse
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from matplotlib.animation import PillowWriter
from torch import nn

import dcem

matplotlib.use("Agg")
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", type=Path, default=Path("."), help="folder for the figures")
parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
parser.add_argument("--tiny", action="store_true", help="smallest sizes (for the tests)")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
dev = torch.device(args.device)
torch.manual_seed(0)  # the MLP's initial weights


def seeded(seed: int) -> torch.Generator:  # DCEM's noise: a fresh stream from a seed
    return torch.Generator(device=dev).manual_seed(seed)


# ---------------------------------------------------------------- part 1: a 2-D landscape
# f(y) = -sum_k exp(a_k) exp(-|y - c_k|^2 / 0.8) + 0.05 |y|^2, centres c_k and log-depths a_k
# learnable. Well 0 is the deepest at the start, so the argmin is near (-1.5, 1).
centres = nn.Parameter(torch.tensor([[-1.5, 1.0], [1.0, 1.5], [0.0, -1.5]], device=dev))
log_depths = nn.Parameter(torch.tensor([0.5, 0.0, 0.0], device=dev))
target = torch.tensor([1.5, -0.5], device=dev)
steps1 = 30 if args.tiny else 50


def landscape(y: torch.Tensor) -> torch.Tensor:
    """Costs of samples y (..., 2) -> (...), for the current centres and log-depths."""
    d2 = (y.unsqueeze(-2) - centres).square().sum(-1)
    wells = (log_depths.exp() * torch.exp(-d2 / 0.8)).sum(-1)
    return -wells + 0.05 * y.square().sum(-1)


def solve(generator: torch.Generator) -> torch.Tensor:
    """DCEM's argmin of the landscape, (2,), differentiable in centres and log_depths."""
    y0 = torch.zeros(1, 2, device=dev)  # B = 1 problem, d = 2; initial std 1.5
    return dcem.dcem(landscape, y0, 1.5, n_sample=100, n_elite=10, n_iter=10,
                     tau=1.0, lb=-3.0, ub=3.0, generator=generator)[0]  # fmt: skip


opt = torch.optim.Adam([centres, log_depths], lr=0.1)
start = (solve(seeded(1)) - target).norm().item()  # evaluated with a fixed noise seed
grid = torch.linspace(-3, 3, 60, device=dev)
mesh = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1)  # (60, 60, 2), for the GIF
gen, losses, frames = seeded(0), [], []
for _ in range(steps1):
    y = solve(gen)
    loss = (y - target).norm()
    frames.append((landscape(mesh).detach().cpu(), y.detach().cpu()))  # before the step
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
final = (solve(seeded(1)) - target).norm().item()
print(f"part 1: distance of DCEM's solution to the target: initial {start:.4f}, final {final:.4f}")

fig, ax = plt.subplots(figsize=(5, 3.2), layout="tight")
ax.plot(losses, marker=".")
ax.set(xlabel="Adam step", ylabel="|y_DCEM - target|", title="Part 1: DCEM solution → target")
fig.savefig(args.out / "dcem_layer_loss.png", dpi=100)

fig, ax = plt.subplots(figsize=(3.6, 3.6))
writer = PillowWriter(fps=6)
with writer.saving(fig, str(args.out / "dcem_layer.gif"), dpi=80):
    for i, (z, y) in enumerate(frames):
        ax.clear()
        ax.contourf(grid.cpu(), grid.cpu(), z, levels=20)
        ax.plot(*target.tolist(), "w*", ms=14, label="target")
        ax.plot(*y.tolist(), "ro", ms=7, label="DCEM argmin")
        ax.set(title=f"step {i}: distance {losses[i]:.2f}", xlabel="y1", ylabel="y2")
        ax.legend(loc="lower left", fontsize=7)
        writer.grab_frame()

# ------------------------------------------------- part 2: an energy MLP on a batch of problems
# E(x, y) = MLP(x, y); the prediction for x is DCEM's argmin over y in [-7, 7], for all P
# training points at once (B = P problems), and the loss is the MSE to y*(x) = x sin x.
n_points, width, steps2 = (16, 16, 60) if args.tiny else (48, 64, 500)
hidden = [nn.Linear(2, width), nn.Softplus(), nn.Linear(width, width), nn.Softplus()]
net = nn.Sequential(*hidden, nn.Linear(width, 1)).to(dev)
x = torch.linspace(0, 2 * math.pi, n_points, device=dev).unsqueeze(-1)  # (P, 1)
y_star = x * torch.sin(x)


def predict(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """argmin_y E(x, y) for points x (B, 1) -> (B, 1), differentiable in the net's weights.
    The energy maps samples y (B, N, 1) to (B, N), each problem b with its own x_b."""
    return dcem.dcem(lambda y: net(torch.cat([x.unsqueeze(1).expand_as(y), y], -1))[..., 0],
                     torch.zeros_like(x), 5.0, n_sample=50, n_elite=5, n_iter=10, tau=1.0,
                     lb=-7.0, ub=7.0, generator=generator)  # fmt: skip


opt = torch.optim.Adam(net.parameters(), lr=2e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps2)
x_dense = torch.linspace(0, 2 * math.pi, 100, device=dev).unsqueeze(-1)
start = (predict(x, seeded(1)) - y_star).square().mean().item()  # fixed noise seed
gen, losses = seeded(0), []
for _ in range(steps2):
    loss = (predict(x, gen) - y_star).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
final = (predict(x, seeded(1)) - y_star).square().mean().item()
print(f"part 2: training MSE of the energy MLP: initial {start:.4f}, final {final:.4f}")

with torch.no_grad():
    after = predict(x_dense, seeded(1))
    ys = torch.linspace(-7, 7, 80, device=dev)
    surface = net(torch.stack(torch.meshgrid(x_dense[:, 0], ys, indexing="xy"), -1))[..., 0]
    surface = surface - surface.min(0).values  # each x's energies relative to their minimum
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="tight")
ax1.semilogy(losses)
ax1.set(xlabel="Adam step", ylabel="training MSE", title="Part 2: loss through DCEM")
ax2.contourf(x_dense[:, 0].cpu(), ys.cpu(), surface.log1p().cpu(), levels=20, cmap="Greys")
ax2.plot(x_dense.cpu(), (x_dense * torch.sin(x_dense)).cpu(), "k--", label="y* = x sin x")
ax2.plot(x_dense.cpu(), after.cpu(), "C0", label="DCEM argmin, trained net")
ax2.scatter(x.cpu(), y_star.cpu(), s=10, c="k", label="training points")
ax2.set(xlabel="x", ylabel="y", ylim=(-7.6, 7.6), title="argmin_y E(x,y); shade log(1+E-min E)")
ax2.legend(fontsize=7, loc="lower left")
fig.savefig(args.out / "dcem_layer_batch.png", dpi=100)
