"""The continual methods beyond plain fine-tuning (`method.name`, docs/architecture.md "The methods").

    registry.py   one descriptor per method, without torch (config and plan read it)
    proximal.py   the proximal term: hooks on every LoRA factor, one distance per method
    peso.py       peso's distance: KL(softmax(vec M) || softmax(vec M_prev)) per LoRA matrix
    l2.py         l2's: ||M - M_prev||^2 (an ablation)

The cumulative methods add the earlier adapters, frozen, through a model add-on
(train/model/addons/frozen_sum.py). Importing this package does not import torch.
"""

from train.methods.registry import METHODS, Method, method, method_names

__all__ = ["METHODS", "Method", "method", "method_names"]
