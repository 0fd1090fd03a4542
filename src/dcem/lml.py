"""The temperature-scaled LML projection (soft top-k) and the hard top-k mask.

The LML polytope is ``{y in R^n : 0 <= y <= 1, sum(y) = k}``. The projection

    lml(x, k, tau) = argmin_{0 < y < 1}  -x'y - tau * H_b(y)   s.t.  1'y = k

(``H_b`` the binary entropy) has the solution ``y_i = sigmoid((x_i + nu) / tau)``
for the unique scalar ``nu`` with ``sum_i y_i = k``. As ``tau -> 0`` it becomes
the hard top-k indicator (:func:`topk_mask`); this is what makes CEM
differentiable (Amos & Yarats, 2020, Prop. 2).

Forward: a root find for ``nu`` per row that converges on the constraint
``|sum(y) - k|``. Stage 1 runs a fixed number of safeguarded Newton steps on
every row from a closed-form initial guess, inside the sort-free bracket
``[-max(z) + c, -min(z) + c]`` with ``z = x / tau`` and ``c = logit(k / n)``; a
step that leaves the bracket is replaced by bisection. There are no
data-dependent breaks and no host syncs in that loop; after it, one host sync
reads the largest residual. Rows not within tolerance (heavy tails at small
``tau``: a staircase of saturated sigmoids; rows with +-inf or NaN) are handled
by a careful path: NaN raises, infinite scores are fixed to 0/1, and the rest is
re-solved in stage 2, the same safeguarded Newton for up to 64 steps from the
midpoint of the k-th and (k+1)-th largest scores (``topk``; for a fractional k a
point found by bisection between two such midpoints), in coordinates
``(x - ref) / tau`` shifted to that point before the division. The projection is
invariant to a shift of a row (not to a scaling), so this keeps the root find exact
when ``|x / tau|`` is large, when a row's sum or ``x / tau`` overflows, and when
``tau`` underflows in float32: finite scores never give NaN (equal scores give
``k / n`` each, scores with gaps much larger than ``tau`` the hard top-k).

Under ``torch.compile`` (:func:`dcem.dcem` with ``compile=True``) the caller can take
stage 1 alone, a fixed number of steps with no host sync that traces into one graph, with a
per-row flag saying whether it converged; rows that did not are solved again eagerly.

Backward: the closed-form implicit gradient, O(n) per row,

    dL/dx_i = (1 / tau) h_i (g_i - sum_j h_j g_j / sum_j h_j),   h = y (1 - y),

never autograd through the solver iterations. It is written in differentiable
operations, so second derivatives (``create_graph``, ``torch.func``) work.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

__all__ = ["lml", "LML", "topk_mask"]

# Stage-1 Newton steps and the stopping tolerance (relative to max(1, k)) per dtype.
_STAGE1_ITERS = {torch.float64: 5, torch.float32: 4}
# ... and how many more below this tau: standardized scores divided by a small tau make a
# steeper staircase of sigmoids, which 4 steps often leave unconverged (stage 2 is slower,
# and a compiled DCEM iteration that needs it runs again eagerly).
_SMALL_TAU, _SMALL_TAU_EXTRA = 0.5, 4
_RTOL = {torch.float64: 1e-11, torch.float32: 1e-5}
_STAGE2_ITERS = 64
# Stage 2 shifts a row to within this many units of tau of its threshold (see _shift).
_NARROW = 64.0
_ROOT_BOUND = 1000.0


def _validate(x: Tensor, k: float, tau: float) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 1 <= k <= n:
        raise ValueError(
            f"k must be a number with 1 <= k <= n = {n} (x: {tuple(x.shape)}), got {k}"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return n


def _newton(
    z: Tensor,
    k: Tensor | float,
    nu: Tensor,
    lo: Tensor,
    hi: Tensor,
    iters: int,
    mask: Tensor | None = None,
    tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Safeguarded Newton on ``g(nu) = sum_i sigmoid(z_i + nu) - k`` inside ``[lo, hi]``.

    z: (r, n); k: (r,) or a number; nu, lo, hi: (r,); mask: (r, n) of 0/1 or None.
    ``iters`` evaluations of g and ``iters - 1`` updates of nu: a fixed count, masks
    instead of breaks, no host syncs (plain tensor code that ``torch.compile`` traces).
    With ``tol`` (eager code only: one host sync every 4 evaluations) it stops early, two
    Newton steps after every row's ``|g| <= tol`` (quadratic convergence: those two steps
    take it to rounding). A Newton step that leaves the bracket is replaced by bisection.

    Returns (y, g, nu): y = sigmoid(z + nu) at the last evaluation, g its residual.
    """
    tiny = torch.finfo(z.dtype).tiny
    stop = iters - 1
    for i in range(iters):
        s = torch.sigmoid(z + nu.unsqueeze(-1))
        if mask is not None:
            s = s * mask
        total = s.sum(-1)
        g = total - k
        if i >= stop:
            break
        if tol is not None and stop == iters - 1 and i % 4 == 3:
            if bool((g.abs() <= tol).all()):
                stop = min(i + 2, stop)
        # sum_i s_i (1 - s_i), kept > 0 so that g = 0 stays put and g != 0 with a
        # flat g (all entries saturated) steps out of the bracket into bisection.
        slope = (total - torch.linalg.vecdot(s, s)).clamp_min(tiny)
        below = g < 0
        lo = torch.where(below, nu, lo)
        hi = torch.where(below, hi, nu)
        step = nu - g / slope
        nu = torch.where(step.clamp(lo, hi) == step, step, torch.lerp(lo, hi, 0.5))
    return s, g, nu


def _normal_quantile(p: float) -> float:
    """Phi^{-1}(p) for 0 < p < 1, remembered per ``p`` in eager code (the bisection is a
    noticeable share of a small DCEM iteration); under ``torch.compile`` it is computed and
    folded into a constant (dynamo warns about a cache wrapper it traces through)."""
    return _bisect_quantile(p) if torch.compiler.is_compiling() else _cached_quantile(p)


def _bisect_quantile(p: float) -> float:
    """Phi^{-1}(p) for 0 < p < 1 by bisection on erfc: plain math on a number."""
    lo, hi = -40.0, 40.0
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_cached_quantile = functools.lru_cache(maxsize=256)(_bisect_quantile)


def _stage1(z: Tensor, k: float, iters: int) -> tuple[Tensor, Tensor]:
    """Stage 1 of the root find on rows z (r, n) = x / tau: ``(y, g)``, the weights and
    their residual ``sum(y) - k`` (r,) after ``iters`` evaluations.

    The closed-form guess treats the scores of a row as Gaussian, N(m, s^2), and uses the
    probit approximation sigmoid(a) ~ Phi(a sqrt(pi / 8)):
    E[sigmoid(Z + nu)] ~ Phi((m + nu) / sqrt(8 / pi + s^2)) = k / n. The sort-free bracket
    is ``[c - max(z), c - min(z)]``, ``c = logit(k / n)``. Rows with NaN or infinite
    entries get NaN residuals.
    """
    n = z.shape[-1]
    # mean, then the centred sum of squares, and amin / amax: on CPU with many short rows
    # these are 20x faster than var_mean and aminmax (one reduction kernel per row)
    m = z.mean(-1)
    dev = z - m.unsqueeze(-1)
    var = torch.linalg.vecdot(dev, dev) / n
    zmin, zmax = z.amin(-1), z.amax(-1)
    c = math.log(k / (n - k))
    lo, hi = c - zmax, c - zmin
    nu = torch.sqrt(var + 8.0 / math.pi) * _normal_quantile(k / n) - m
    y, g, _ = _newton(z, k, torch.clamp(nu, lo, hi), lo, hi, iters)
    return y, g


def _offsets(x: Tensor, ref: Tensor, tau: float) -> Tensor:
    """``(x - ref) / tau`` (r, n) for scores x (r, n) and row shifts ref (r, 1), never NaN.

    The difference is exact near ``ref`` (Sterbenz) and rounded once elsewhere; a
    difference that overflows is halved first, so ``tau > 1`` still brings it back into
    range. The division is done in float64 (a float32 ``tau`` may underflow to 0 or
    overflow to inf). Offsets beyond ``+-finfo.max / 4`` are clamped there: with ``ref``
    from :func:`_shift` the root of the shifted problem lies within ``_ROOT_BOUND`` of 0, so
    such entries have weight exactly 1 or 0 either way. ``-inf`` entries (the masked ones)
    give ``-finfo.max / 4``.
    """
    big = torch.finfo(x.dtype).max / 4
    xd, rd = x.double(), ref.double()
    d = xd - rd
    d = torch.where(torch.isfinite(d), d / tau, (0.5 * xd - 0.5 * rd) / tau * 2.0)
    return d.clamp(-big, big).to(x.dtype)


def _shift(x: Tensor, k: Tensor, m: Tensor, tau: float) -> Tensor:
    """A shift ``ref`` (r, 1) of each row within a few units of ``tau`` of the threshold
    ``-nu`` of the projection, so that the root find in the shifted coordinates of
    :func:`_offsets` is as precise as near 0 and clamps no entry that is not saturated.

    x: (r, n) unscaled scores, -inf at masked entries; k: (r,) targets with 0 < k < m;
    m: (r,) number of finite entries. With ``kk = floor(k)``, the threshold lies within
    ``log(2n)`` (in units of ``tau``) of the midpoint of the kk-th and (kk+1)-th largest
    scores for an integer k: that midpoint is the ref. For a fractional k it lies between
    that midpoint (or the largest score) and the next one (or the smallest score); a
    bracket wider than ``_NARROW`` units of ``tau`` is bisected in the scores' coordinates
    until it is not (one host sync per step), or until its ends are neighbouring floats.
    The ref is then the end next to the threshold.
    """
    kk = k.floor().minimum(m - 1)
    width = min(int(kk.max()) + 2, x.shape[-1])
    top = x.topk(width, dim=-1).values

    def at(i: Tensor) -> Tensor:  # the (i+1)-th largest score of each row, (r, 1)
        return top.gather(-1, i.clamp(0, width - 1).long().unsqueeze(-1))

    # halves first: the sum of two scores near the dtype's limit would overflow
    hi = torch.where((kk >= 1).unsqueeze(-1), 0.5 * at(kk - 1) + 0.5 * at(kk), at(kk))
    lo = torch.where((kk + 2 <= m).unsqueeze(-1), 0.5 * at(kk) + 0.5 * at(kk + 1), at(kk))
    lo = torch.where((k == kk).unsqueeze(-1), hi, lo)
    for _ in range(2200):  # a bracket of 2 * finfo.max halves to one of 1e-324 in ~2100 steps
        mid = 0.5 * lo + 0.5 * hi
        wide = ((0.5 * hi.double() - 0.5 * lo.double()) / tau > _NARROW / 2) & (mid > lo)
        wide &= mid < hi
        if not bool(wide.any()):
            break
        up = torch.sigmoid(_offsets(x, mid, tau)).sum(-1, keepdim=True) > k.unsqueeze(-1)
        lo = torch.where(wide & up, mid, lo)  # the threshold is above mid
        hi = torch.where(wide & ~up, mid, hi)
    narrow = (0.5 * hi.double() - 0.5 * lo.double()) / tau <= _NARROW / 2
    above = (x >= hi).sum(-1, keepdim=True).to(k.dtype)
    return torch.where(narrow | (above >= k.unsqueeze(-1)), hi, lo)


def _solve_shifted(
    x: Tensor, k: Tensor, m: Tensor, mask: Tensor | None, tau: float, tol: float | None = None
) -> Tensor:
    """Stage 2: safeguarded Newton in coordinates shifted near the threshold.

    x: (r, n) unscaled scores, -inf where ``mask`` (r, n) is 0; k: (r,) targets with
    0 < k < m; m: (r,) number of finite entries per row. Shifting by ``ref``
    (:func:`_shift`, the midpoint of the k-th and (k+1)-th largest scores for an integer k)
    before dividing by ``tau`` (:func:`_offsets`) makes the differences that decide the
    weights near the threshold exact, however large ``|x|`` or ``|x / tau|`` is (even where
    ``x / tau`` or a row's sum overflows): the projection is invariant to a shift of a row.
    The bracket is recomputed in these coordinates and widened by a few ulps so that
    rounding cannot exclude the root. ``tol``: stop the Newton steps early once every row
    is within it (see :func:`_newton`). Returns y: (r, n).
    """
    w = _offsets(x, _shift(x, k, m, tau), tau)
    w_max = w.amax(-1)
    if mask is not None:
        w = torch.where(mask.bool(), w, torch.zeros_like(w))
        w_min = torch.where(mask.bool(), w, torch.full_like(w, math.inf)).amin(-1)
    else:
        w_min = w.amin(-1)
    c = torch.log(k / (m - k))
    # The root lies within _NARROW + log(2n) + log(1 / min(k, m - k)) (a few hundred at
    # most) of 0 (see _shift): a bracket bounded by _ROOT_BOUND takes no more than a few
    # dozen bisections, whatever the span of the offsets.
    lo = (c - w_max).clamp_min(-_ROOT_BOUND)
    hi = (c - w_min).clamp_max(_ROOT_BOUND)
    pad = 4 * torch.finfo(x.dtype).eps * (lo.abs() + hi.abs() + 1.0)
    lo, hi = lo - pad, hi + pad
    delta = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi)
    y, _, _ = _newton(w, k, delta, lo, hi, _STAGE2_ITERS, mask, tol)
    return y


def _solve_nonfinite(x: Tensor, k: float, n: int, tau: float) -> Tensor:
    """Rows with +-inf scores: +inf is always selected, -inf never. x: (r, n) unscaled."""
    pos, neg = x == math.inf, x == -math.inf
    finite = ~(pos | neg)
    p, m = pos.sum(-1), finite.sum(-1)
    k_fin = k - p.to(x.dtype)  # what the finite entries must add up to
    if bool(((k_fin < 0) | (k_fin > m)).any()):
        raise ValueError(
            f"x has more +inf entries than k = {k} or more -inf entries than n - k in a row"
        )
    m_safe = m.clamp(min=2).to(x.dtype)
    k_safe = torch.minimum(torch.maximum(k_fin, torch.full_like(k_fin, 0.5)), m_safe - 0.5)
    xm = torch.where(finite, x, torch.full_like(x, -math.inf))
    y = _solve_shifted(xm, k_safe, m_safe, finite.to(x.dtype), tau)
    fill = torch.where(k_fin <= 0, 0.0, torch.where(k_fin >= m, 1.0, -1.0)).unsqueeze(-1)
    y = torch.where(fill >= 0, fill.to(x.dtype).expand_as(y) * finite, y)
    return torch.where(pos, torch.ones_like(y), y)


def _forward(
    x: Tensor, k: float, tau: float, max_iter: int | None, finish: bool
) -> tuple[Tensor, Tensor]:
    """The projection of x (..., n) and a (...,) flag per row: converged.

    ``finish``: rows that stage 1 leaves unconverged are finished by :func:`_careful`
    (one host sync; NaN raises) and every flag is True. Otherwise stage 1 is all there is:
    no host sync, no data-dependent branch (what ``torch.compile`` traces into one graph),
    and the flags say which rows met the tolerance; the caller finishes the others.
    """
    n = x.shape[-1]
    work = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).reshape(-1, n)
    done = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if k == n:
        if finish and bool(torch.isnan(work).any() | (work == -math.inf).any()):
            raise ValueError(f"x contains NaN or -inf but k = n = {n} selects every entry")
        return torch.ones_like(x), done
    # x / tau may overflow (or, in float32, tau underflow) for finite x: such rows do not
    # converge in stage 1 and are solved from the unscaled x by the careful path.
    flat = work / tau if tau != 1.0 else work
    tol = _RTOL[flat.dtype] * max(1.0, float(k))
    if max_iter is None:
        max_iter = _STAGE1_ITERS[flat.dtype] + (_SMALL_TAU_EXTRA if tau < _SMALL_TAU else 0)
    y, g = _stage1(flat, k, max_iter)
    if not finish:
        return y.reshape(x.shape).to(x.dtype), (g.abs() <= tol).reshape(done.shape)
    # The one host sync: NaN/inf scores give NaN residuals and fail the test too.
    if not float(g.abs().max()) <= tol:
        y = _careful(work, y, g, k, n, tol, tau)
    return y.reshape(x.shape).to(x.dtype), done


def _careful(x: Tensor, y: Tensor, g: Tensor, k: float, n: int, tol: float, tau: float) -> Tensor:
    """Rows that stage 1 left unconverged: +-inf scores, NaN (an error), or hard inputs
    (a staircase of saturated sigmoids, scores whose sum or quotient by tau overflows).
    x: (r, n) the unscaled scores."""
    finite_rows = torch.isfinite(x).all(-1)
    if not bool(finite_rows.all()):
        if bool(torch.isnan(x).any()):
            raise ValueError(f"x contains NaN (shape {tuple(x.shape)}); lml needs ordered scores")
        rows = (~finite_rows).nonzero().squeeze(-1)
        y = y.index_copy(0, rows, _solve_nonfinite(x[rows], k, n, tau))
    rows = (finite_rows & ~(g.abs() <= tol)).nonzero().squeeze(-1)
    if rows.numel():
        k_t = torch.full((rows.numel(),), float(k), dtype=x.dtype, device=x.device)
        y_rows = _solve_shifted(x[rows], k_t, torch.full_like(k_t, n), None, tau, tol)
        y = y.index_copy(0, rows, y_rows)
        err = float((y_rows.sum(-1) - k).abs().max())
        if err > tol:
            warnings.warn(
                f"lml: |sum(y) - k| = {err:.3g} after the root find (tolerance {tol:.3g})",
                RuntimeWarning,
                stacklevel=6,
            )
    return y


def _vjp(y: Tensor, grad: Tensor, tau: float) -> Tensor:
    """Implicit gradient of the projection: (1/tau) h (g - <h, g> / sum h), h = y (1 - y).

    Plain differentiable operations: double backward and ``torch.func`` transforms
    differentiate and batch it like any other code.
    """
    h = y - y * y
    hsum = h.sum(-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    out = (grad - (h * grad).sum(-1, keepdim=True) / hsum) * h  # 0 where every h is 0
    if tau < torch.finfo(y.dtype).tiny:  # tau is 0 in y's dtype: divide in float64
        return out.double().div(tau).to(y.dtype)
    return out / tau if tau != 1.0 else out


class _LMLFunction(torch.autograd.Function):
    """``(x, k, tau, max_iter, finish) -> (y, converged)`` (see :func:`_forward`): the root
    find in the forward, the closed-form implicit gradient (:func:`_vjp`) in the backward."""

    @staticmethod
    def forward(
        x: Tensor, k: float, tau: float, max_iter: int | None, finish: bool
    ) -> tuple[Tensor, Tensor]:
        return _forward(x, k, tau, max_iter, finish)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.tau = inputs[2]
        ctx.save_for_backward(output[0])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _grad_done):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return _vjp(y, grad, ctx.tau), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, k, tau, max_iter, finish):  # type: ignore[override]
        # A vmapped dimension is just one more leading batch dimension.
        x = x.movedim(in_dims[0], 0)
        return _LMLFunction.apply(x, k, tau, max_iter, finish), (0, 0)


def _lml(x: Tensor, k: float, tau: float, finish: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`lml` without the argument checks, for :mod:`dcem.optim`: ``(y, ok)``.

    ``finish=True``: the exact projection, ``ok`` None. ``finish=False``: stage 1 only
    (the fixed-iteration form that ``torch.compile`` traces without a graph break) and
    ``ok``, a 0-dim bool tensor: every row converged. Where it is False the caller must
    compute the projection again with ``finish=True``.
    """
    y, done = _LMLFunction.apply(x, k, tau, None, finish)
    return y, (None if finish else done.all())


def lml(x: Tensor, k: float, tau: float = 1.0, *, max_iter: int | None = None) -> Tensor:
    """Project ``x / tau`` onto the LML polytope along the last dimension (soft top-k).

    Solves ``argmin_{0<y<1} -x'y - tau * H_b(y)  s.t.  sum(y) = k`` for every row;
    the answer is ``y = sigmoid((x + nu) / tau)`` with the row's dual ``nu``.

    Args:
        x: scores, shape ``(..., n)``, any floating dtype and device (the output
            follows them; float16/bfloat16 are solved in float32). Higher scores get
            weights nearer 1. ``+inf`` entries are always selected (weight 1) and
            ``-inf`` never (weight 0).
        k: the number of entries to select, ``1 <= k <= n`` (may be fractional).
        tau: temperature ``> 0``; it divides the scores. ``tau -> 0`` gives the hard
            top-k indicator :func:`topk_mask`, large ``tau`` gives ``k / n`` everywhere.
        max_iter: residual evaluations of stage 1 (default 4 for float32, 5 for
            float64, 4 more when ``tau < 0.5``; one Newton step between each two). Rows
            not converged by then are finished by a robust stage 2.

    Returns:
        y: shape ``(..., n)``, ``0 <= y <= 1`` and ``sum(y, -1) = k`` to about
        ``1e-11 * max(1, k)`` in float64 and ``1e-5 * max(1, k)`` in float32. Finite
        scores give a finite answer however large (up to the dtype's limit) or however
        small ``tau`` is; the gradient is finite unless its true value exceeds the
        dtype's range (``tau`` below about ``1 / finfo.max``).

    Gradients are the closed-form implicit ones (O(n), never through the solver),
    themselves differentiable (second derivatives). Works under ``torch.func``
    (``vmap``, ``grad``, ``vjp``, ``jacrev``). Under ``torch.compile`` the input checks
    (NaN, infinities) and the stage-2 fallback are data-dependent, so dynamo breaks the
    graph around this call and runs it eagerly; the surrounding code is still compiled
    (:func:`dcem.dcem` with ``compile=True`` compiles stage 1 with its iteration instead).

    Raises:
        ValueError: non-floating ``x``, empty last dimension, ``k`` outside
            ``[1, n]``, ``tau`` not a finite number ``> 0``, ``max_iter`` not None or an
            integer ``>= 1``, NaN in ``x``, or more ``+inf`` entries than
            ``k`` (``-inf`` than ``n - k``) in a row.
    """
    _validate(x, k, tau)
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
    ):
        raise ValueError(f"max_iter must be None or an integer >= 1, got {max_iter!r}")
    return _LMLFunction.apply(x, k, float(tau), max_iter, True)[0]


class LML(torch.nn.Module):
    """Module form of :func:`lml` holding ``k`` and ``tau``; input ``(..., n)``."""

    def __init__(self, k: float, tau: float = 1.0) -> None:
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 1:
            raise ValueError(f"k must be a number >= 1, got {k}")
        self.k, self.tau = k, float(tau)

    def forward(self, x: Tensor) -> Tensor:
        return lml(x, self.k, self.tau)

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau}"


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Hard top-k indicator along the last dimension: the ``tau -> 0`` limit of :func:`lml`.

    Args:
        x: scores ``(..., n)``, floating dtype.
        k: integer ``1 <= k <= n``.

    Returns:
        ``(..., n)`` tensor of ``x``'s dtype with 1 at the ``k`` largest entries of
        each row and 0 elsewhere (ties are broken by ``torch.topk``). No gradient.
    """
    n = _validate(x, k, 1.0)
    if not float(k).is_integer():
        raise ValueError(f"k must be an integer for topk_mask, got {k}")
    if torch.isnan(x).any():
        raise ValueError(f"x contains NaN (shape {tuple(x.shape)})")
    k = int(k)
    idx = x.detach().topk(k, dim=-1).indices if k < n else None
    if idx is None:
        return torch.ones_like(x).detach()
    return torch.zeros_like(x).detach().scatter_(-1, idx, 1.0)
