"""Numeric command-line options checked against one table of rules per command, before any work:
0, negative, NaN, infinite and huge values get one line naming the option and the value (exit 1,
as every error in a well-formed command line). A value that means "the default" is None, never 0."""

from typing import Dict

from .errors import OpenELMError
from .files import Rule, integer, rule, shown

# The largest integer MLX's random seed takes (a uint64), and so every --seed.
MAX_SEED = 2**64 - 1
# Counts of steps, trials and tokens: far beyond any real run, small enough to stay exact.
MAX_COUNT = 1 << 31


def count(low: int = 1, high: int = MAX_COUNT) -> Rule:
    return integer(low, high)


SEED = integer(0, MAX_SEED)


def between(low: float, high: float) -> Rule:
    """A finite number from low to high, both included (NaN fails every comparison)."""
    return rule(lambda v: type(v) in (int, float) and low <= v <= high, f"must be a number from {low:g} to {high:g}")


def check_options(values: Dict[str, object], rules: Dict[str, Rule]):
    """Raise OpenELMError for the first option (by its attribute name) that breaks its rule."""
    for name, check in rules.items():
        problem = check(values[name]) if name in values else None
        if problem:
            value = values[name]
            problem = problem.replace(f", got {shown(value)}", f", got {value}")
            raise OpenELMError(f"--{name.replace('_', '-')} {problem}")
