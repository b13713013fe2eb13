"""The training loss of the recommender: cross-entropy of the labelled tokens (a target item's
code tokens, and EOS in the response objective), on logits divided by `method.temperature`.

The output layer runs only on the positions the loss reads (`logits_to_keep`): from the first
labelled column of the micro-batch on (train/loop/data.py's `collate`), so a long prompt costs no
vocabulary-sized logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_tools.index.prompt import IGNORE


def lm_loss(engine, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the labelled tokens, their count) for one micro-batch."""
    targets = batch["targets"]
    out = engine(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=targets.shape[1] + 1,
    )
    logits = out.logits[:, :-1].float() / temperature
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (targets != IGNORE).sum()
