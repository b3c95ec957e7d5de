"""The shared class embedding (smapctl/models/class_embed.py): the null class and its dropout for
classifier-free guidance."""

import pytest
import torch

from smapctl.models.class_embed import ClassEmbedding


def test_class_dropout_replaces_a_fraction_p_of_the_labels_by_the_null_class():
    # Classifier-free guidance training: each label becomes the null class with probability p, else stays.
    embed = ClassEmbedding(5, 4)
    labels = torch.arange(4000) % 5
    for p in (0.1, 0.7):
        dropped = embed.drop(labels, p, torch.Generator().manual_seed(0))
        null = dropped == embed.null_class
        assert abs(null.float().mean().item() - p) < 0.03
        assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(embed.drop(labels, 0.0), labels)


def test_the_table_has_the_classes_and_one_null_row_last():
    # Id num_classes is the null class and the last row: a checkpoint's table is (num_classes + 1, dim),
    # and an id past it is an error, not a silently trained spare row.
    embed = ClassEmbedding(5, 4)
    assert embed.null_class == 5
    assert embed.table.weight.shape == (6, 4)
    torch.testing.assert_close(embed(torch.tensor([5])), embed.table.weight[-1:])
    with pytest.raises(IndexError):
        embed(torch.tensor([6]))


def test_no_dropout_draws_no_random_numbers():
    # With p = 0 (no CFG training) the generator is left as it was: the draws that follow it (CARD's
    # flow times and noise) are those of a model without class dropout at all.
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    labels = torch.arange(5)
    assert torch.equal(ClassEmbedding(5, 4).drop(labels, 0.0, g), labels)
    assert torch.equal(g.get_state(), state)
