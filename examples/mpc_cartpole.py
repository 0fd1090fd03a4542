"""Model-predictive control of the cartpole with CEM and DCEM, and a gradient through a plan.

With a known model, ``dcem.control.run_mpc`` re-plans the next H steps at every step (CEM or
DCEM over the H forces) and applies the first force. Both swing the pole up from hanging;
pushing nothing (zero force) is the baseline. Then, since DCEM's plan is differentiable, the
cost of the plan ``solve_horizon`` returns has a gradient w.r.t. a physical parameter, here the
pole's half-length ``l``: it is checked against a central finite difference with the same
noise seed (common random numbers) and one gradient step on ``l`` lowers the planned cost.

Run: ``python examples/mpc_cartpole.py [--out DIR] [--device cpu|cuda] [--tiny]``; it writes
``mpc_cartpole.png``, ``mpc_cartpole.gif`` and ``mpc_cartpole_grad.png`` to DIR.
"""

import argparse
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import PillowWriter

from dcem.control import (
    DT,
    CartpoleParams,
    SolverConfig,
    rollout,
    rollout_cost,
    run_mpc,
    solve_horizon,
)

matplotlib.use("Agg")
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", type=Path, default=Path("."), help="folder for the figures")
parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
parser.add_argument("--tiny", action="store_true", help="smallest sizes (for the tests)")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
kw = dict(dtype=torch.float64, device=torch.device(args.device))  # float64 for the FD check
n_states, n_steps, horizon, n_sample = (2, 20, 10, 50) if args.tiny else (3, 100, 20, 200)


def seeded(seed: int) -> torch.Generator:  # the optimizers' noise: a fresh stream from a seed
    return torch.Generator(device=kw["device"]).manual_seed(seed)


# Swing-up starts: state (x, xdot, cos θ, sin θ, θdot), θ = 0 upright; pole hanging (θ = π ± 0.3)
# below a cart near the centre, both at rest.
noise = 2 * torch.rand(2, n_states, generator=seeded(0), **kw) - 1
theta, zeros = math.pi + 0.3 * noise[0], torch.zeros(n_states, **kw)
x_init = torch.stack([0.2 * noise[1], zeros, theta.cos(), theta.sin(), zeros], -1)

# --------------------------------------------------------------- closed loop: MPC vs no force
sizes = dict(n_sample=n_sample, n_elite=n_sample // 10, n_iter=10)
solvers = {"CEM": SolverConfig("cem", **sizes), "DCEM": SolverConfig("dcem", tau=0.5, **sizes)}
states, cost = {}, {}
for name, solver in solvers.items():
    result = run_mpc(x_init, n_steps=n_steps, horizon=horizon, solver=solver, warm_start=True,
                     generator=seeded(1))  # fmt: skip
    states[name], cost[name] = result.states, -result.total_reward  # cost = -sum of rewards
no_force = torch.zeros(n_states, n_steps, **kw)
states["do-nothing"], cost["do-nothing"] = rollout(x_init, no_force), rollout_cost(x_init, no_force)
print(f"total cost over {n_steps} steps (= -total reward; mean of {n_states} swing-up starts):")
for name, c in cost.items():
    print(f"  {name:<11} {c.mean().item():9.3f}")

t = np.arange(n_steps + 1) * DT
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="tight")
for i, (name, s) in enumerate(states.items()):
    s = s.cpu().numpy()
    for b in range(n_states):  # |θ| in [0, π]: 0 upright, π hanging
        axes[0].plot(t, np.abs(np.arctan2(s[b, :, 3], s[b, :, 2])), f"C{i}", label=name)
        axes[1].plot(t, s[b, :, 0], f"C{i}", label=name)
    axes[2].bar(i, cost[name].mean().item(), color=f"C{i}")
    axes[2].plot([i] * n_states, cost[name].cpu(), "k.")
axes[0].set(xlabel="time (s)", ylabel="|θ| (rad), 0 = upright", title="Pole angle from upright")
axes[1].set(xlabel="time (s)", ylabel="cart position x (m)", title="Cart position")
axes[2].set(xticks=range(3), xticklabels=list(states), ylabel="total cost (lower is better)",
            title="Cost per controller (bar: mean, dots: starts)")  # fmt: skip
for ax in axes[:2]:  # one legend entry per controller
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::n_states], labels[::n_states], fontsize=8)
fig.savefig(args.out / "mpc_cartpole.png", dpi=100)

length, s = 2 * CartpoleParams().l, states["DCEM"][0].cpu().numpy()  # the first start's episode
fig, ax = plt.subplots(figsize=(4, 2.4), layout="tight")
writer = PillowWriter(fps=10)
with writer.saving(fig, str(args.out / "mpc_cartpole.gif"), dpi=90):
    for k in range(0, n_steps + 1, max(1, n_steps // 25)):  # at most about 25 frames
        x, cos_th, sin_th = s[k, 0], s[k, 2], s[k, 3]
        ax.clear()
        ax.axhline(0, c="gray", lw=1)
        ax.add_patch(plt.Rectangle((x - 0.2, -0.1), 0.4, 0.2, color="C1"))  # the cart
        ax.plot([x, x + length * sin_th], [0, length * cos_th], "k-", lw=3)  # the pole
        ax.set(xlim=(-2, 2), ylim=(-1.2, 1.2), aspect="equal", yticks=[], xlabel="x (m)")
        ax.set_title(f"DCEM MPC, t = {t[k]:.2f} s", fontsize=9)
        writer.grab_frame()

# ---------------------------------------------- a gradient through DCEM w.r.t. the pole length
# The plan's cost is a function of params once the noise is fixed: smooth, but for kinks where
# a sample crosses a force bound (DCEM clamps samples to them), so the finite difference uses
# a small step h, in float64. The sweep in the figure shows the same function over l.


def plan_cost(params: torch.Tensor) -> torch.Tensor:
    """Mean cost of DCEM's H-step plans from the starts with fixed noise: smooth in params."""
    plan = solve_horizon(x_init, horizon=horizon, solver=solvers["DCEM"], params=params,
                         generator=seeded(2))  # fmt: skip
    return plan.cost.mean()


params = CartpoleParams().as_tensor(**kw).requires_grad_()  # (g, m_c, m_p, l)
before = plan_cost(params)
(grad,) = torch.autograd.grad(before, params)  # through DCEM's iterations and the rollout
e_l, h, lr = torch.tensor([0.0, 0.0, 0.0, 1.0], **kw), 1e-6, 0.0025
with torch.no_grad():
    fd = (plan_cost(params + h * e_l) - plan_cost(params - h * e_l)) / (2 * h)
    stepped = params - lr * grad[3] * e_l  # one gradient step on l only
    after = plan_cost(stepped)
l0, l1, g_l = params[3].item(), stepped[3].item(), grad[3].item()
c0, c1 = before.item(), after.item()
print(f"d(plan cost)/dl: autograd through DCEM {g_l:.6f}, finite difference {fd.item():.6f}")
print(f"one gradient step, l {l0:.4f} -> {l1:.4f}: plan cost {c0:.4f} -> {c1:.4f}")

ls = torch.linspace(0.3, 0.7, 9 if args.tiny else 41, **kw)
with torch.no_grad():
    sweep = [plan_cost(torch.cat([params[:3], l.view(1)])).item() for l in ls]
fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="tight")
ax.plot(ls.cpu(), sweep, "C0.-", label="DCEM plan cost (same noise)")
ax.plot([l0 - 0.08, l0 + 0.08], [c0 - 0.08 * g_l, c0 + 0.08 * g_l], "C3", label="slope")
ax.plot([l0, l1], [c0, c1], "ko", label="before / after one step")
ax.set(xlabel="pole half-length l (m)", ylabel=f"mean cost of the {horizon}-step plans",
       title="DCEM plan cost vs l; slope = autograd gradient")  # fmt: skip
ax.legend(fontsize=8)
fig.savefig(args.out / "mpc_cartpole_grad.png", dpi=100)
