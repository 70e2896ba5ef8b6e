"""Exact float64 solvers for the small T x T problems of the Gramian methods.

Why not torchjd's solvers for MGDA / UPGrad / DualProj: torchjd normalises the Gramian by its trace and adds
``1e-4 * I`` (UPGrad, DualProj) or stops Frank-Wolfe at a 1e-3 step (MGDA). With RL task gradients whose norms
differ by 100x or more, the regularisation swamps the small tasks and the "non-conflicting" guarantee fails.

Here every problem is solved in *cosine coordinates*: with ``n_i = |g_i|`` and ``C = D^-1 G D^-1`` (unit diagonal,
``D = diag(n)``), the variables are rescaled by ``D``, so the problem seen by the solver is well conditioned
whatever the norm spread, and the guarantees are exact up to float64 rounding (tested at spreads of 1e6):

* ``nnqp``: min 1/2 x^T Q x + c^T x s.t. x >= 0 -- a primal active-set method (Lawson-Hanson / Bro-de Jong
  "fast NNLS" on the normal equations), finite, exact for positive-definite Q; no regularisation (even a 1e-10
  ridge costs 1e-4 relative accuracy on ill-conditioned C); the face problems are solved with a pseudo-inverse
  (relative cutoff 1e-12), so linearly dependent or exactly opposite task gradients (singular C) are handled;
* ``mgda_weights``: the min-norm point of the convex hull of the g_i, a QP on the simplex solved by a primal
  active-set method (``simplex_qp``; bounded and exact also when 0 is in the hull); g_i.d >= |d|^2 for every i
  (non-conflicting);
* ``dual_cone_weights``: v = argmin v^T G v s.t. v >= a, i.e. the projection of J^T a onto the dual cone
  {x : J x >= 0} (UPGrad: a = e_i for every i; DualProj: a = 1/T);
* ``nash_weights``: the Nash bargaining solution G alpha = 1 / alpha via Newton's method on the strictly convex
  f(b) = 1/2 b^T C b - sum log b (its gradient C b - 1/b vanishes exactly at the solution);
* ``cagrad_weights``: min_{w in simplex} w^T G 1/T + c |g_0| sqrt(w^T G w) by an active-set projected Newton
  method (``exact``), SLSQP (as the official code; scipy, imported only then) or the MTRL reference's 20
  momentum-SGD steps on softmax logits;
* ``config_weights``: ConFIG's direction ``pinv(U) 1`` expressed through the Gramian.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def _as_numpy(gramian: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(gramian, Tensor):
        gramian = gramian.detach().to("cpu", torch.float64).numpy()
    g = np.asarray(gramian, dtype=np.float64)
    return (g + g.T) / 2


def cosine_coordinates(gramian: Tensor | np.ndarray, zero_tol: float = 1e-15
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(norms n, cosine matrix C of the nonzero rows, boolean mask of the nonzero rows)."""
    g = _as_numpy(gramian)
    n = np.sqrt(np.clip(np.diag(g), 0.0, None))
    nz = n > zero_tol * max(float(n.max(initial=0.0)), 1e-300)
    nz &= n > 0
    m = n[nz]
    c = g[np.ix_(nz, nz)] / np.outer(m, m)
    c = np.clip((c + c.T) / 2, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return n, c, nz


def _psd_solve(q: np.ndarray, b: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """The minimum-norm solution of q x = b for a symmetric PSD ``q`` (pseudo-inverse with a relative cutoff):
    exact where q is definite, and a minimiser of 1/2 x^T q x - b^T x where q is singular and b in its range (the
    face problems of the dual-cone QPs, whose linear term is C a, always are)."""
    try:  # fast path: a well-conditioned positive-definite block (Cholesky pivots as the condition estimate)
        low = np.linalg.cholesky(q)
        piv = np.diag(low) ** 2
        if piv.min() > 1e3 * rcond * piv.max():
            return np.linalg.solve(q, b)
    except np.linalg.LinAlgError:
        pass
    w, v = np.linalg.eigh(q)
    keep = w > rcond * max(float(w.max(initial=0.0)), 1e-300)
    return v[:, keep] @ ((v[:, keep].T @ b) / w[keep])


def nnqp(q: np.ndarray, c: np.ndarray, tol: float = 1e-13, max_iter: Optional[int] = None) -> np.ndarray:
    """argmin_{x >= 0} 1/2 x^T q x + c^T x for a symmetric positive (semi)definite ``q``."""
    k = c.shape[0]
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    scale = max(1.0, float(np.abs(c).max(initial=0.0)))
    thr = tol * scale
    max_iter = max_iter or (10 * k + 50)

    def solve_passive() -> np.ndarray:
        s = np.zeros(k)
        idx = np.flatnonzero(passive)
        if idx.size:
            s[idx] = _psd_solve(q[np.ix_(idx, idx)], -c[idx])
        return s

    for _ in range(max_iter):
        w = -(q @ x + c)  # minus the gradient: positive where increasing x_j helps
        w[passive] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= thr:
            break
        passive[j] = True
        s = solve_passive()
        inner = 0
        while passive.any() and s[passive].min() <= 0 and inner <= k:
            inner += 1
            idx = np.flatnonzero(passive & (s <= 0))
            steps = x[idx] / np.maximum(x[idx] - s[idx], 1e-300)
            alpha = float(np.min(steps)) if idx.size else 1.0
            x = x + alpha * (s - x)
            passive &= x > thr * 1e-3
            x[~passive] = 0.0
            s = solve_passive()
        x = np.where(passive, np.maximum(s, 0.0), 0.0)
    return x


def simplex_qp(c: np.ndarray, a: np.ndarray, tol: float = 1e-12, max_iter: Optional[int] = None) -> np.ndarray:
    """argmin_y 1/2 y^T c y s.t. a^T y = 1, y >= 0 (``c`` PSD, ``a`` > 0): a primal active-set method.

    On the support S the face optimum solves [[c_SS, a_S], [a_S^T, 0]] [y_S; -mu] = [0; 1]; a step toward it that
    would leave y >= 0 is cut and the blocking index leaves S; at a face optimum the index i outside S with the most
    negative (c y)_i - mu a_i enters. Always bounded (also when 0 is in the convex hull, where c_SS is singular:
    least squares then), finite, exact.
    """
    k = a.shape[0]
    scale = float(a.max())
    a = a / scale  # equilibrated: y' = y * scale
    y = np.zeros(k)
    j0 = int(np.argmin(np.diag(c) / a**2))  # the best vertex
    y[j0] = 1.0 / a[j0]
    support = np.zeros(k, dtype=bool)
    support[j0] = True
    max_iter = max_iter or (10 * k + 50)
    for _ in range(max_iter):
        idx = np.flatnonzero(support)
        m = idx.size
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = c[np.ix_(idx, idx)]
        kkt[:m, m] = a[idx]
        kkt[m, :m] = a[idx]
        rhs = np.zeros(m + 1)
        rhs[m] = 1.0
        try:
            sol = np.linalg.solve(kkt, rhs)
            if not np.all(np.isfinite(sol)):
                raise np.linalg.LinAlgError
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
        target = np.zeros(k)
        target[idx] = sol[:m]
        if np.all(target[idx] > 0):
            y = target
            cy = c @ y
            mu = float(y @ cy)  # = mu at a face optimum (a^T y = 1)
            gap = cy - mu * a
            gap[support] = np.inf
            i = int(np.argmin(gap))
            if gap[i] >= -tol * (abs(mu) * a[i] + abs(cy[i]) + 1e-300):
                break
            support[i] = True
            continue
        d = target - y
        neg = support & (d < 0)
        steps = y[neg] / -d[neg]
        alpha = float(np.min(steps)) if steps.size else 1.0
        y = y + min(alpha, 1.0) * d
        blocking = support & (y <= 1e-15 * (1.0 / a).max())
        if not blocking.any():  # numerical safety: drop the smallest
            blocking = np.zeros(k, dtype=bool)
            blocking[idx[int(np.argmin(y[idx]))]] = True
        support &= ~blocking
        y[~support] = 0.0
        if not support.any():
            support[j0] = True
            y[:] = 0.0
            y[j0] = 1.0 / a[j0]
    y = np.clip(y, 0.0, None)
    return y / scale


def mgda_weights(gramian: Tensor | np.ndarray) -> np.ndarray:
    """MGDA: w on the simplex minimising |J^T w| (the min-norm point of the convex hull of the g_i).

    In cosine coordinates y = D w: min y^T C y s.t. sum_i y_i / n_i = 1, y >= 0 (``simplex_qp``). At the optimum
    g_i . d >= |d|^2 for every i (non-conflicting), with equality on the support.
    """
    n, c, nz = cosine_coordinates(gramian)
    t = n.shape[0]
    w = np.zeros(t)
    if not nz.all():  # a zero gradient is in the hull: the min-norm point is 0
        w[int(np.flatnonzero(~nz)[0])] = 1.0
        return w
    y = simplex_qp(c, 1.0 / n)
    w = y / n
    return w / w.sum()


def dual_cone_weights(gramian: Tensor | np.ndarray, lower: np.ndarray) -> np.ndarray:
    """For each column a of ``lower`` (T x m, a >= 0): v = argmin v^T G v s.t. v >= a. Returns T x m.

    ``J^T v`` is the projection of ``J^T a`` onto the dual cone {x : g_i . x >= 0 for all i}.
    """
    lower = np.asarray(lower, dtype=np.float64)
    if lower.ndim == 1:
        lower = lower[:, None]
    n, c, nz = cosine_coordinates(gramian)
    out = lower.copy()
    if not nz.any():
        return out
    m = n[nz]
    for col in range(lower.shape[1]):
        a = lower[nz, col]
        ya = m * a  # the lower bound in cosine coordinates
        if not ya.any():
            continue
        x = nnqp(c, c @ ya)
        out[nz, col] = a + x / m
    return out


def upgrad_weights(gramian: Tensor | np.ndarray) -> np.ndarray:
    """UPGrad: (1/T) sum_i v_i with v_i the dual-cone projection weights of g_i."""
    t = _as_numpy(gramian).shape[0]
    return dual_cone_weights(gramian, np.eye(t)).mean(axis=1)


def dualproj_weights(gramian: Tensor | np.ndarray) -> np.ndarray:
    """DualProj: projection of the mean gradient onto the dual cone."""
    t = _as_numpy(gramian).shape[0]
    return dual_cone_weights(gramian, np.full(t, 1.0 / t))[:, 0]


def nash_weights(gramian: Tensor | np.ndarray, init: Optional[np.ndarray] = None, tol: float = 1e-10,
                 max_iter: int = 100, ridge: float = 1e-8) -> Tuple[np.ndarray, bool]:
    """Nash-MTL: alpha > 0 with G alpha = 1 / alpha on the raw Gramian (Navon et al. 2022, Alg. 1; the official
    code divides G by |G|_F for its solver but multiplies it back in the constraint alpha_i (G alpha)_i >= 1).

    In cosine coordinates (G = D C D, D = diag |g_i|) put alpha = b / |g|: the equation becomes C b = 1 / b,
    the stationarity condition of the strictly convex f(b) = 1/2 b^T C b - sum log b, minimised by damped Newton
    steps. ``init``: a previous alpha (warm start). Returns (alpha, converged). Zero gradients get weight 0.
    ``ridge`` (added to C) keeps f bounded below when the gradients are Pareto-stationary (no exact solution then;
    the ridge picks a large finite one, as the reference's CCP does).
    """
    g = _as_numpy(gramian)
    t = g.shape[0]
    n, c, nz = cosine_coordinates(g)
    alpha = np.zeros(t)
    if not nz.any():
        return alpha, True
    m = n[nz]
    k = int(nz.sum())
    cr = c + ridge * np.eye(k)
    b = np.ones(k)
    if init is not None and np.all(np.isfinite(init)) and np.all(np.asarray(init)[nz] > 0):
        b = np.asarray(init, dtype=np.float64)[nz] * m

    def f(v: np.ndarray) -> float:
        return 0.5 * v @ cr @ v - np.log(v).sum()

    converged = False
    for _ in range(max_iter):
        r = cr @ b - 1.0 / b
        if np.linalg.norm(r) <= tol * max(1.0, np.linalg.norm(1.0 / b)):
            converged = True
            break
        h = cr + np.diag(1.0 / b**2)
        try:
            step = -np.linalg.solve(h, r)
        except np.linalg.LinAlgError:
            step = -r
        neg = step < 0
        tmax = float(np.min(-b[neg] / step[neg])) if neg.any() else np.inf
        lr = min(1.0, 0.99 * tmax)
        f0, slope = f(b), float(r @ step)
        while lr > 1e-12 and f(b + lr * step) > f0 + 1e-4 * lr * slope:
            lr *= 0.5
        b = b + lr * step
    alpha[nz] = b / m
    return alpha, converged


def cagrad_weights(gramian: Tensor | np.ndarray, c: float, rescale: int = 1, solver: str = "exact",
                   sgd_lr: float = 25.0, sgd_steps: int = 20) -> Tuple[np.ndarray, np.ndarray]:
    """CAGrad (Liu et al. 2021): weights on the rows of J, and the inner simplex solution w.

    d = g0 + (c |g0| / |g_w|) g_w with w = argmin_{w in simplex} w^T G 1/T + c |g0| sqrt(w^T G w); then
    rescale 0: d, 1: d / (1 + c^2), 2: d / (1 + c). ``solver="sgd"`` reproduces the MTRL reference as it runs,
    its normalisation and 1e-4 terms included (``_cagrad_sgd``).
    """
    g = _as_numpy(gramian)
    t = g.shape[0]
    if solver == "sgd":
        w = _cagrad_sgd(g, c, sgd_lr, sgd_steps)
        return w[0] / _rescale(c, rescale), w[1]
    scale = float(np.mean(np.diag(g)))
    if scale <= 0 or c == 0:
        w = np.full(t, 1.0 / t)
        return np.full(t, 1.0 / t) / _rescale(c, rescale), w
    gs = g / scale  # conditioning only: w is scale invariant
    b = gs.mean(axis=1)
    g0_norm = float(np.sqrt(max(gs.mean(), 0.0)))
    k = c * g0_norm
    if solver == "exact":
        w = _cagrad_active_set(gs, b, k)
    elif solver == "slsqp":  # the official supervised code (Cranial-XIX/CAGrad nyuv2/utils.py)
        from scipy.optimize import minimize

        def obj(x: np.ndarray) -> Tuple[float, np.ndarray]:
            r = np.sqrt(max(float(x @ gs @ x), 1e-30))
            return float(x @ b + k * r), b + k * (gs @ x) / r

        res = minimize(obj, np.full(t, 1.0 / t), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                       constraints=[{"type": "eq", "fun": lambda x: 1.0 - x.sum(),
                                     "jac": lambda x: -np.ones_like(x)}],
                       options={"ftol": 1e-12, "maxiter": 500})
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()
    else:
        raise ValueError(f"cagrad: solver={solver!r} is invalid; expected one of ['exact', 'slsqp', 'sgd']")
    gw_norm = float(np.sqrt(max(w @ gs @ w, 0.0)))
    lam = k / gw_norm if gw_norm > 1e-12 else 0.0
    weights = (np.full(t, 1.0 / t) + lam * w) / _rescale(c, rescale)
    return weights, w


def _cagrad_active_set(gs: np.ndarray, b: np.ndarray, k: float, tol: float = 1e-12, max_iter: int = 500
                       ) -> np.ndarray:
    """argmin_{w in simplex} F(w) = b^T w + k sqrt(w^T gs w): active-set projected Newton.

    On the current support S, Newton steps restricted to sum(w_S) = 1 (KKT system with one multiplier); a step
    that would leave the simplex is cut at the boundary and the variable leaves S; at a face optimum (all
    gradients on S equal to mu) an index j outside S with grad_j < mu enters. F is convex, so the face optimum
    with no entering index is the global optimum (the KKT conditions of the simplex problem hold).
    """
    t = b.shape[0]
    w = np.full(t, 1.0 / t)
    support = np.ones(t, dtype=bool)

    def f(x: np.ndarray) -> float:
        return float(x @ b + k * np.sqrt(max(float(x @ gs @ x), 0.0)))

    gscale = max(1e-300, float(np.abs(b).max()) + k * float(np.sqrt(np.abs(np.diag(gs)).max())))
    for _ in range(max_iter):
        q = gs @ w
        r = float(np.sqrt(max(float(w @ q), 0.0)))
        if r <= 1e-150:  # g_w = 0: a Pareto-stationary mix, F is linear there; nothing better to do
            break
        grad = b + k * q / r
        idx = np.flatnonzero(support)
        m = idx.size
        hess = k * (gs[np.ix_(idx, idx)] / r - np.outer(q[idx], q[idx]) / r**3)
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = hess + 1e-12 * np.eye(m)
        kkt[:m, m] = 1.0
        kkt[m, :m] = 1.0
        rhs = np.concatenate([-grad[idx], [0.0]])
        try:
            sol = np.linalg.solve(kkt, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
        d = np.zeros(t)
        d[idx] = sol[:m]
        slope = float(grad @ d)
        if not np.isfinite(slope) or slope >= 0:  # Newton direction unusable: projected gradient on the face
            d = np.zeros(t)
            d[idx] = -(grad[idx] - grad[idx].mean())
            slope = float(grad @ d)
        face_opt = float(np.abs(grad[idx] - grad[idx].mean()).max()) <= tol * gscale
        if face_opt or np.abs(d).max() <= 1e-9 or -slope <= 1e-20 * gscale:
            mu = float(grad[idx].mean())
            enter = (~support) & (grad < mu - tol * gscale)
            if not enter.any():
                break
            support[int(np.argmin(np.where(enter, grad, np.inf)))] = True
            continue
        neg = d < 0
        amax = float(np.min(w[neg] / -d[neg])) if neg.any() else np.inf
        a = min(1.0, amax)
        f0 = f(w)
        while a > 1e-16 and f(w + a * d) > f0 + 1e-4 * a * slope:
            a *= 0.5
        if a <= 1e-12 and amax > 1e-12:  # no progress possible on this face: treat it as optimal
            mu = float(grad[idx].mean())
            enter = (~support) & (grad < mu - 1e-9 * gscale)
            if not enter.any():
                break
            support[int(np.argmin(np.where(enter, grad, np.inf)))] = True
            continue
        w = w + a * d
        if a == amax:
            support &= w > 1e-15
        w[~support] = 0.0
        w = np.clip(w, 0.0, None)
        w = w / w.sum()
    return w


def _rescale(c: float, rescale: int) -> float:
    return {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]


def _cagrad_sgd(g: np.ndarray, c: float, lr: float, steps: int) -> Tuple[np.ndarray, np.ndarray]:
    """CAGrad as the MTRL code runs it (Cranial-XIX/CAGrad ``mtrl/mtrl_files/cagrad.py::cagrad``), on the RAW
    Gramian: G is divided by s^2 with s = mean_i sqrt(G_ii + 1e-4) (so the 1e-4 terms below are relative to that
    scale); k = c sqrt(mean(G) + 1e-4); momentum-SGD (0.5) on softmax logits for ``steps`` steps, keeping the
    iterate of the lowest objective w^T G 1/T + k sqrt(w^T G w + 1e-4); then lambda = k / (sqrt(w^T G w + 1e-4)
    + 1e-4) and the row weights 1/T + lambda w (before the rescale). Returns (row weights, w)."""
    t = g.shape[0]
    s = float(np.mean(np.sqrt(np.diag(g) + 1e-4)))
    gg = torch.as_tensor(g / s**2, dtype=torch.float64)
    g_mean = gg.mean(1, keepdim=True)
    cc = float(np.sqrt(float(g_mean.mean()) + 1e-4)) * c
    logits = torch.zeros(t, 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=lr, momentum=0.5)
    best, best_obj = logits.detach().clone(), float("inf")
    for i in range(steps + 1):
        opt.zero_grad()
        ww = torch.softmax(logits, 0)
        obj = ww.t().mm(g_mean) + cc * (ww.t().mm(gg).mm(ww) + 1e-4).sqrt()
        if obj.item() < best_obj:
            best_obj, best = obj.item(), logits.detach().clone()
        if i < steps:
            obj.backward()
            opt.step()
    w = torch.softmax(best, 0).view(-1).numpy()
    gw_norm = float(np.sqrt(float(w @ gg.numpy() @ w) + 1e-4))
    return np.full(t, 1.0 / t) + w * (cc / (gw_norm + 1e-4)), w


def config_weights(gramian: Tensor | np.ndarray) -> np.ndarray:
    """ConFIG (Liu, Chu, Thuerey 2025) as a weighting of the rows of J.

    With U the unit rows, the reference computes u = pinv(U) 1 (least squares), g_u = u / |u| and
    d = (sum_i g_i . g_u) g_u. Since pinv(U) = U^T pinv(U U^T) = U^T pinv(C), u = J^T a with a = D^-1 pinv(C) 1,
    |u|^2 = a^T G a and sum_i g_i . u = 1^T G a, so d = J^T a (1^T G a) / (a^T G a).
    """
    g = _as_numpy(gramian)
    t = g.shape[0]
    n, c, nz = cosine_coordinates(g)
    out = np.zeros(t)
    if not nz.any():
        return out
    a_nz = np.linalg.pinv(c, hermitian=True) @ np.ones(int(nz.sum()))
    a = np.zeros(t)
    a[nz] = a_nz / n[nz]
    q = float(a @ g @ a)
    if q <= 0:
        return out
    return a * float(np.ones(t) @ g @ a) / q
