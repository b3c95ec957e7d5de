"""The class-embedding module shared by SMAP's encoder and decoder; CARD starts from a copy of it, and every
generator conditions on one through `ClassCondition`."""

import torch
from torch import nn

from smapctl.config import check


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
        """labels (B,) -> (B,): each replaced by the null class with probability `p` (classifier-free
        guidance training)."""
        if p <= 0:
            return labels
        u = torch.rand(labels.shape, device=labels.device, generator=generator)
        return torch.where(u < p, torch.full_like(labels, self.null_class), labels)


class ClassCondition(nn.Module):
    """Class ids -> (B, width): a `ClassEmbedding` (shared with the tokenizer, or our own) + a projection.

    Used by CARD, LlamaGen and MaskGIT alike. A given `class_embed` is used as it is (training builds
    the generator with a copy of the tokenizer's, `train/generator.py`); `freeze` stops its gradients.
    """

    def __init__(
        self,
        num_classes: int,
        class_dim: int,
        width: int,
        class_embed: ClassEmbedding | None = None,
        freeze: bool = False,
    ):
        super().__init__()
        if class_embed is None:
            class_embed = ClassEmbedding(num_classes, class_dim)
        else:  # (a recipe that does not fit its tokenizer is refused before: `train.generator`)
            shape = (class_embed.num_classes, class_embed.dim)
            check(
                shape == (num_classes, class_dim),
                "class_embed",
                f"the shared class embedding has {shape[0]} classes x {shape[1]} dims, but the generator"
                f" config asks for num_classes={num_classes}, class_dim={class_dim}",
            )
        if freeze:
            class_embed.requires_grad_(False)
        self.embed = class_embed
        self.proj = nn.Linear(class_dim, width)

    @property
    def null_class(self) -> int:
        return self.embed.null_class

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) in [0, num_classes] -> (B, width)."""
        return self.proj(self.embed(labels))

    def drop(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """labels (B,) -> (B,), each the null class with probability `p` (`ClassEmbedding.drop`)."""
        return self.embed.drop(labels, p, generator)

    def with_null(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> (2B,) = [labels; null class]: the row layout of classifier-free guidance."""
        return torch.cat([labels, torch.full_like(labels, self.null_class)])
