"""OPT architecture: shape checks, weight loading and the functional forward pass."""
