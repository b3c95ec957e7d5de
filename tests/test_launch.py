"""Which launcher started how many processes: torchrun's variables and those of MPI launchers."""

import pytest

from smapctl.errors import UserError
from smapctl.launch import cpu_processes, has_gpu, launched_processes, refuse_multi_process

SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def plain_process(monkeypatch):
    for name in SIZES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_plain_process_is_alone(plain_process):
    assert launched_processes() == 1
    assert not cpu_processes()
    refuse_multi_process("tokenize")  # no error


@pytest.mark.parametrize("variable", SIZES)
def test_mpi_launchers_count_as_launchers(variable, plain_process):
    # `accelerate launch --cpu --mpirun_hostfile` and `mpirun` set OMPI_/PMI_/MV2_ sizes, not WORLD_SIZE:
    # read only WORLD_SIZE, each process trained alone into the same run folder.
    plain_process.setenv(variable, "2")
    assert launched_processes() == 2
    assert cpu_processes() == (not has_gpu())
    with pytest.raises(UserError, match="smapctl tokenize runs as one process, but the launcher started 2"):
        refuse_multi_process("tokenize")
    refuse_multi_process("train-tokenizer")  # spreads over the processes
