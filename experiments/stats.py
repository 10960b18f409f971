"""Numbers over seeds for experiments/ablate.py: mean ± sd, and paired differences with a 95%
interval from Student's t, computed here (no scipy): two rows trained with the same seed share
their stage-1 output and data order, so the per-seed differences are what varies."""
import math


def mean_std(values):
    """(mean, sample standard deviation with n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_within(t, df):
    """P(|T| <= t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3
    and 26.7.4): θ = atan(t/√df); odd df: (2/π)(θ + sin θ cos θ (1 + 2/3 cos²θ + (2·4)/(3·5)
    cos⁴θ + ...)), even df: sin θ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ...), up to cos^(df-2)."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for j in range(3 if df % 2 else 2, df, 2):
        term *= c2 * (j - 1) / j
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0))


def t_quantile(p, df):
    """The p quantile (p > 0.5) of Student's t with integer df >= 1, by bisection."""
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < 2 * p - 1 else (low, mid)
    return (low + high) / 2


def paired(values, reference):
    """Per-seed differences values[s] - reference[s] -> (their mean, the half-width of its 95%
    interval, t quantile 0.975 with n - 1 df times sd / √n; None for one seed)."""
    if len(values) != len(reference):
        raise ValueError(f"paired differences need one value per seed in both rows, got "
                         f"{len(values)} and {len(reference)}")
    mean, sd = mean_std([v - r for v, r in zip(values, reference)])
    if sd is None:
        return mean, None
    return mean, t_quantile(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def cell(values):
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def difference(values, reference):
    """'mean ± half-width' of the paired difference, in bold when its 95% interval excludes 0."""
    mean, half = paired(values, reference)
    if half is None:
        return f"{mean:+.1f}"  # one seed: no interval, no claim
    text = f"{mean:+.1f} ± {half:.1f}"
    return f"**{text}**" if abs(mean) > half else text


def spread(values):
    """seed 0 (the first), mean ± sd and min-max of one number over seeds, for the Quickstart."""
    fmt = (lambda v: f"{v:.3f}") if max(abs(v) for v in values) <= 1 else (lambda v: f"{v:.1f}")
    mean, std = mean_std(values)
    return (fmt(values[0]), fmt(mean) + ("" if std is None else f" ± {fmt(std)}"),
            f"{fmt(min(values))}–{fmt(max(values))}")
