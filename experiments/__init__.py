"""Experiments on the toy: the paper's ablation tables and figures, re-run."""
