"""Bad input to the library, as a new user would give it: extreme but finite values get the
exact answer, anything else a ValueError/TypeError naming the argument, never a silent NaN."""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest
import torch

import dcem

F64 = torch.float64


def reference_lml(x: list[float], k: float, tau: float = 1.0) -> list[float]:
    """Independent reference: bisection for nu in decimal arithmetic with enough digits for
    the largest |x / tau| to 1e-30 (the floats are converted exactly: no shift, no rounding
    of the scores, no overflow), then rounded to float."""
    with localcontext() as ctx:
        ctx.prec = 700  # enough for |x / tau| < 1e640
        t, kd = Decimal(tau), Decimal(k)
        zs = [Decimal(v) / t for v in x]
        ctx.prec = max([40] + [z.adjusted() + 40 for z in zs if z])

        def weights(nu: Decimal) -> list[Decimal]:
            out = []
            for z in zs:
                a = z + nu
                if abs(a) > 500:
                    out.append(Decimal(1 if a > 0 else 0))
                    continue
                with localcontext() as low:  # |a| <= 500: 40 digits are plenty for the sigmoid
                    low.prec = 40
                    out.append(1 / (1 + (-a).exp()))
            return out

        lo, hi = -max(zs) - 1000, -min(zs) + 1000
        while hi - lo > Decimal("1e-30"):
            mid = (lo + hi) / 2
            if sum(weights(mid)) < kd:
                lo = mid
            else:
                hi = mid
        return [float(w) for w in weights((lo + hi) / 2)]


# ----------------------------------------------------------------------------- 1. lml


@pytest.mark.parametrize(
    ("row", "k", "tau", "dtype"),
    [
        ([2e38] * 10, 3, 1.0, torch.float32),  # the example: k / n each
        ([1e308] * 10, 3, 1.0, F64),
        ([3e38, -3e38, 1e38, -1e38], 2, 1.0, torch.float32),  # huge gaps: hard top-k
        ([3.4e38, 3.4e38, -3.4e38, -3.4e38], 3, 1.0, torch.float32),  # ties share
        ([1.7e308, 1.7e308, -1.7e308, -1.7e308], 1, 1.0, F64),
        ([1.7e308, -1.7e308, 0.0, 5.0], 2, 1.0, F64),
        ([3e38, 3e38, 1e38, -3.4e38], 2.5, 1.0, torch.float32),  # fractional k
        ([3e38, -3e38, -3e38], 2.5, 1.0, torch.float32),
        ([1.7e308, 1.7e308, -1.7e308, 0.0], 1.5, 1.0, F64),
        ([1.7e308, -1.7e308, 1.0, -1.7e308, 0.0], 1.25, 1e-300, F64),
        ([1.0, 1.0 + 2**-23, 0.0, -3e38], 1.5, 1e-30, torch.float32),  # neighbouring floats
        ([3.4e38, 1e38, -3.4e38], 2, 1e38, torch.float32),  # tau brings it into range
        ([1.7e308, 1e308, -1.7e308, 0.0], 2, 1e308, F64),  # x - ref overflows, / tau does not
        ([1e30, 1e30, 0.0], 1, 1e-30, torch.float32),  # x / tau overflows: ties still share
        ([0.0, 0.0, 0.0], 1, 1e-50, torch.float32),  # tau underflows in float32
        ([-1e30, -1e30, 0.0], 2, 1e-30, torch.float32),
    ],
)
def test_lml_extreme_finite_inputs_are_exact(row: list, k: float, tau: float, dtype) -> None:
    x = torch.tensor([row], dtype=dtype)
    y = dcem.lml(x, k, tau)
    want = torch.tensor([reference_lml([float(v) for v in x[0]], k, tau)], dtype=dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, want, atol=atol, rtol=0)


def test_lml_k_equals_n_with_overflowing_scaled_scores() -> None:
    # x / tau = -inf for a finite x: every entry is still selected
    assert dcem.lml(torch.tensor([[-3e38, 0.0]]), 2, 0.1).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(("value", "dtype"), [(2e38, torch.float32), (1e308, F64)])
def test_lml_gradient_is_finite_and_exact_at_extremes(value: float, dtype) -> None:
    x = torch.full((2, 10), value, dtype=dtype, requires_grad=True)
    g = torch.arange(20, dtype=dtype).view(2, 10)
    (dcem.lml(x, 3) * g).sum().backward()
    # equal weights y = 0.3: the implicit gradient is y (1 - y) (g - mean(g)) per row
    want = 0.3 * 0.7 * (g - g.mean(-1, keepdim=True))
    torch.testing.assert_close(x.grad, want)


def test_lml_gradient_with_a_tau_that_underflows_in_float32_is_not_nan() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    y = dcem.lml(x, 1, 1e-50)  # 1e-50 is 0 in float32
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert y.tolist() == [[0.0, 0.0, 1.0]]
    assert x.grad.tolist() == [[0.0, 0.0, 0.0]]  # every weight saturated: h = y (1 - y) = 0
