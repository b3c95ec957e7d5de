"""`smapctl.devices`: the default device, and when two device names are one device."""

import torch

from smapctl.devices import default_device, same_device


def test_the_default_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


def test_a_name_without_an_index_is_the_current_device(monkeypatch):
    assert same_device("cpu", "cpu:0") and same_device(torch.device("cpu"), "cpu")
    assert not same_device("cpu", "meta") and same_device("meta", "meta")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # after torch.cuda.set_device(1)
    assert same_device("cuda", "cuda:1") and same_device("cuda:1", "cuda")
    assert not same_device("cuda", "cuda:0") and not same_device("cuda:0", "cuda:1")
    assert not same_device("cuda", "cpu")
