#!/usr/bin/env python3
"""Fits the erf approximation of src/embedding/local/gelu.rs.

erf(x) ~ x * P(x^2) / Q(x^2) on [0, 3.92], Q(0) = 1, P and Q of degree 5,
minimising the absolute error: linearised least squares (Sanathanan-Koerner
iterations), then Lawson reweighting towards the minimax fit. Needs only
mpmath (python3 -m pip install mpmath). Prints the largest error on the fit
grid and the coefficients, constant term first.

    python3 scripts/erf_fit.py [p q clamp]     # default: 5 5 3.92
"""
import sys

import mpmath as mp

mp.mp.dps = 40
p, q, clamp = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])) if len(sys.argv) == 4 else (5, 5, 3.92)
N = 600
# Chebyshev-spaced points (dense near the ends) plus an even grid.
xs = [mp.mpf(clamp) * (1 - mp.cos(mp.pi * (i + 0.5) / N)) / 2 for i in range(N)]
xs += [mp.mpf(clamp) * i / N for i in range(1, N + 1)]
fs = [mp.erf(x) for x in xs]


def solve(weights, q_prev):
    """Least squares for x P(t) - f Q(t) = 0 (t = x^2), scaled by 1/Q_prev."""
    rows, rhs = [], []
    for x, f, w, qp in zip(xs, fs, weights, q_prev):
        t, s = x * x, mp.sqrt(w) / qp
        rows.append([s * x * t**j for j in range(p + 1)] + [-s * f * t**j for j in range(1, q + 1)])
        rhs.append(s * f)
    sol, _ = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))
    return [sol[j] for j in range(p + 1)], [mp.mpf(1)] + [sol[p + 1 + j] for j in range(q)]


def evaluate(P, Q, x):
    t = x * x
    qv = mp.polyval(Q[::-1], t)
    return x * mp.polyval(P[::-1], t) / qv, qv


weights = [mp.mpf(1)] * len(xs)
q_prev = [mp.mpf(1)] * len(xs)
for _ in range(6):
    P, Q = solve(weights, q_prev)
    q_prev = [evaluate(P, Q, x)[1] for x in xs]
for _ in range(40):
    P, Q = solve(weights, q_prev)
    errors = [abs(evaluate(P, Q, x)[0] - f) for x, f in zip(xs, fs)]
    q_prev = [evaluate(P, Q, x)[1] for x in xs]
    total = sum(w * e for w, e in zip(weights, errors))
    weights = [max(w * e / total, mp.mpf(1e-30)) for w, e in zip(weights, errors)]
errors = [abs(evaluate(P, Q, x)[0] - f) for x, f in zip(xs, fs)]
print("max |error|", mp.nstr(max(errors), 3), "min Q", mp.nstr(min(q_prev), 12))
print("P", [mp.nstr(c, 12) for c in P])
print("Q", [mp.nstr(c, 12) for c in Q])
