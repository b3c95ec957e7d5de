"""The class-embedding module shared by SMAP's encoder and decoder; CARD starts from a copy of it."""

import torch
from torch import nn


class ClassEmbedding(nn.Module):
    """Maps class ids to vectors; id `num_classes` is the reserved "null" class used for guidance.

    Paper section 3.2: one module, trained jointly with the tokenizer, is used in both towers; section
    3.3 ("semantic condition sharing") reuses it as CARD's condition: the generator starts from a copy
    (`train/generator.py`), fine-tuned unless `freeze_class_embed`.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) int64 in [0, num_classes] -> (B, dim)."""
        return self.table(labels)

    def drop(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability `p` (classifier-free guidance training)."""
        if p <= 0:
            return labels
        u = torch.rand(labels.shape, device=labels.device, generator=generator)
        return torch.where(u < p, torch.full_like(labels, self.null_class), labels)
