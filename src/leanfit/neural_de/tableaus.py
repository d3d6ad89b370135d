"""Butcher tableaus of the explicit embedded Runge-Kutta pairs, as float64 data.

A tableau holds everything a step needs: nodes ``c``, the strictly lower-triangular stage matrix ``a`` (row ``i``
has ``i`` entries), the propagating weights ``b``, the error weights ``b_error = b - b_hat`` (``b_hat`` are the
embedded lower-order weights, so the local error estimate is ``h * sum_i b_error[i] * k_i``), and optionally the
method's own continuous extension ("free interpolant"): ``interpolant[i][p]`` is the coefficient of
``theta**(p + 1)`` in the weight polynomial ``b_i(theta)``, so that
``y(t + theta h) = y + h * sum_i b_i(theta) k_i`` for ``theta`` in ``[0, 1]`` at no extra function evaluation.

Sources of the numbers:

- ``TSIT5``: Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
  assumption", Comput. Math. Appl. 62 (2011) 770-775, Table 1, with the first column from the row-sum condition,
  as used by OrdinaryDiffEq.jl (``tsit_tableaus.jl``), torchode (``single_step_methods/tsit5.py``) and diffrax.
  The paper's ``b_hat`` row are in fact the error weights ``b - b_hat`` (diffrax issue #98), and its last entry
  has the wrong sign: ``-1/66``, not ``+1/66`` (OrdinaryDiffEq.jl issue #1654); with it the error weights sum to
  zero. The interpolant is the paper's 4th-order continuous extension, expanded in powers of theta (it matches
  OrdinaryDiffEq.jl's ``r11 ... r74`` coefficients).
- ``DOPRI5``: J.R. Dormand and P.J. Prince, "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math.
  6 (1980); error weights and the dense output of Hairer, Norsett & Wanner, Solving ODEs I, II.5-II.6 (Fortran
  ``DOPRI5``/``CONTD5``, coefficients ``d1 ... d7``, Shampine 1986), expanded exactly with ``fractions`` into the
  per-stage theta polynomials below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from leanfit.core.errors import bad_value

__all__ = ["DOPRI5", "TABLEAUS", "TSIT5", "ButcherTableau", "check_tableau", "get_tableau"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta pair. All coefficients are Python floats (IEEE float64)."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    order: int
    error_order: int
    fsal: bool
    interpolant: tuple[tuple[float, ...], ...] | None = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def error_exponent(self) -> int:
        """Power of ``h`` in the local error estimate: ``error_order + 1`` (5 for a 5(4) pair)."""
        return self.error_order + 1


def check_tableau(tableau: ButcherTableau, tol: float = 1e-12) -> None:
    """Check the consistency conditions; raise ``ValueError`` naming the first violated one.

    Conditions: ``a`` is strictly lower triangular (row ``i`` has ``i`` entries); ``sum_j a_ij = c_i``;
    ``sum_i b_i = 1``; ``sum_i b_error_i = 0`` (the embedded weights also sum to one); FSAL means the last row
    of ``a`` equals ``b[:-1]``, ``b[-1] = 0`` and ``c[-1] = 1``; an interpolant must reproduce ``b`` at ``theta = 1``.
    """
    if not isinstance(tableau, ButcherTableau):
        raise TypeError(bad_value("tableau", tableau, "a ButcherTableau", "pass e.g. TSIT5 or get_tableau('tsit5')"))
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(bad_value("tol", tol, "a finite float >= 0", "use the default tol=1e-12"))
    s, name = tableau.stages, tableau.name
    if len(tableau.a) != s or any(len(row) != i for i, row in enumerate(tableau.a)):
        raise ValueError(f"tableau {name!r}: a must be strictly lower triangular with {s} rows (row i has i entries)")
    if len(tableau.b) != s or len(tableau.b_error) != s:
        raise ValueError(f"tableau {name!r}: b and b_error must have {s} entries, one per stage")
    for i, (row, ci) in enumerate(zip(tableau.a, tableau.c, strict=True)):
        if abs(math.fsum(row) - ci) > tol:
            raise ValueError(f"tableau {name!r}: row sum of a[{i}] is {math.fsum(row)!r}, expected c[{i}]={ci!r}")
    if abs(math.fsum(tableau.b) - 1.0) > tol:
        raise ValueError(f"tableau {name!r}: sum(b)={math.fsum(tableau.b)!r}, expected 1")
    if abs(math.fsum(tableau.b_error)) > tol:
        raise ValueError(f"tableau {name!r}: sum(b_error)={math.fsum(tableau.b_error)!r}, expected 0")
    if tableau.fsal:
        gap = max(abs(x - y) for x, y in zip(tableau.a[-1], tableau.b[:-1], strict=True))
        if gap > tol or tableau.b[-1] != 0.0 or tableau.c[-1] != 1.0:
            raise ValueError(f"tableau {name!r}: fsal=True needs a[-1] == b[:-1], b[-1] == 0 and c[-1] == 1")
    if tableau.interpolant is not None:
        for i, (poly, bi) in enumerate(zip(tableau.interpolant, tableau.b, strict=True)):
            if abs(math.fsum(poly) - bi) > 1e3 * tol:  # the published Tsit5 polynomials agree with b to ~1e-14
                raise ValueError(f"tableau {name!r}: interpolant b_{i}(1)={math.fsum(poly)!r}, expected b[{i}]={bi!r}")


TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774),
    ),
    b=(0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0),
    b_error=(
        0.00178001105222577714,
        0.0008164344596567469,
        -0.007880878010261995,
        0.1447110071732629,
        -0.5823571654525552,
        0.45808210592918697,
        -1.0 / 66.0,
    ),
    order=5,
    error_order=4,
    fsal=True,
    interpolant=(
        (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
        (0.0, 0.1317, -0.2234, 0.1017),
        (0.0, 3.930296236894751, -5.941033872131505, 2.490627285651253),
        (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
        (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
        (0.0, -27.896526289197286, 65.09189467479368, -34.87065786149661),
        (0.0, 1.5, -4.0, 2.5),
    ),
)

DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_error=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
    order=5,
    error_order=4,
    fsal=True,
    interpolant=(
        (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
        (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
        (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
        (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
        (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
    ),
)

TABLEAUS: dict[str, ButcherTableau] = {"tsit5": TSIT5, "dopri5": DOPRI5}


def get_tableau(method: str | ButcherTableau) -> ButcherTableau:
    """The tableau named ``method`` (``"tsit5"`` or ``"dopri5"``), or ``method`` itself if already a tableau."""
    if isinstance(method, ButcherTableau):
        return method
    if not isinstance(method, str):
        raise TypeError(bad_value("method", method, f"one of {sorted(TABLEAUS)} or a ButcherTableau",
                                  "pass method='tsit5' (default)"))
    if method not in TABLEAUS:
        raise ValueError(
            f"method={method!r} is invalid: expected one of {sorted(TABLEAUS)} or a ButcherTableau; "
            "pass method='tsit5' (default) or build your own ButcherTableau and check it with check_tableau"
        )
    return TABLEAUS[method]
