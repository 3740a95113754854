"""The pure maths: statistics, greedy selection and refit, the baselines' scores, budget allocation.

Tensors and numbers in, tensors and numbers out: nothing here knows about modules, models or files.
"""
