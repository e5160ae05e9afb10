"""Pure functions from K log-probability tensors (and parameters) to one log-probability tensor.

Inputs are never modified. Each function accepts NumPy arrays or PyTorch tensors of any
shape (the vocabulary, when there is one, on the last axis) and returns the same kind.
"""
from arfuse.fusion.linear import k_to_w, linear, uniform, w_to_k, logprob_average, check_weights

__all__ = ["linear", "uniform", "logprob_average", "check_weights", "k_to_w", "w_to_k"]
