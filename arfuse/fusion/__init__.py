"""Fusion rules: pure functions from K log-probability tensors (and parameters) to one, and the
registry that names them (``arfuse.fusion.registry``).

Inputs are never modified. Each function accepts NumPy arrays or PyTorch tensors of any
shape (the vocabulary, when there is one, on the last axis) and returns the same kind.
"""
from arfuse.fusion.linear import k_to_w, linear, logprob_average, uniform, w_to_k
from arfuse.fusion.registry import (Fit, Param, Rule, available_rules, check_same_vocab, check_weights,
                                    cross_tokenizer_hint, get_rule, make_rule, register_rule, resolve_weights,
                                    unregister_rule)

__all__ = ["linear", "uniform", "logprob_average", "check_weights", "k_to_w", "w_to_k", "Rule", "Param",
           "Fit", "available_rules", "get_rule", "make_rule", "register_rule", "unregister_rule", "resolve_weights",
           "check_same_vocab", "cross_tokenizer_hint"]
