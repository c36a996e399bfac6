"""A tiny module with one bug, the code-patch verifier's fixture repository."""


def add(a, b):
    """Return the sum of a and b."""
    return a - b


def mean(values):
    """Return the arithmetic mean of a non-empty sequence."""
    total = 0
    for v in values:
        total = add(total, v)
    return total / len(values)
