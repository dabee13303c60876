def mean(values):
    """Return the arithmetic mean of a non-empty sequence."""
    total = 0
    for value in values:
        total += value
    return total / len(values)


def clamp(x, low, high):
    """Limit x to the closed interval [low, high]."""
    return max(low, min(x, high))


if __name__ == "__main__":
    print(mean([1, 2, 3, 4]), clamp(7, 0, 5))
