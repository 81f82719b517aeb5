"""Data-parallel training as SageMaker's `torch_distributed` launches it.

With `distribution={"torch_distributed": {"enabled": True}}` (the hyperparameter
`sagemaker_torch_distributed_enabled`), the PyTorch training image's toolkit starts train.py under
`torchrun`, one process per GPU (or per `sagemaker_mpi_num_of_processes_per_host`) on every
instance, with `RANK`, `LOCAL_RANK` and `WORLD_SIZE` set. Without it, or with one process, nothing
here does anything: a `Group` of one.

Each process trains on its own share of the training photos; DistributedDataParallel averages the
gradients, so every process holds the same weights after every step. The main process (rank 0)
alone evaluates, prints the metric lines, writes checkpoints and the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()  # one process: what train.py is without torchrun


def setup(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs);
    the group and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    group = Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        device = torch.device("cuda", group.local_rank)
    # Hours, not the default half hour: the others wait while the main process scores the test set.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
    return group, device


def teardown(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.barrier()  # the main process has written the model: nobody leaves before it
        dist.destroy_process_group()


def share(items: list, group: Group) -> list:
    """This process's share of `items`: every world-th one, from its rank on."""
    return items[group.rank :: group.world]


def share_length(total: int, group: Group) -> int:
    """How many items each process goes through per epoch: the largest share, so that every
    process takes the same number of steps (the smaller shares wrap around, as torch's
    DistributedSampler pads)."""
    return -(-total // group.world)


def sum_floats(values: list[float], group: Group) -> list[float]:
    """`values` summed over every process."""
    if not group.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: object, group: Group) -> list:
    """`obj` of every process, in rank order."""
    if not group.active:
        return [obj]
    gathered: list = [None] * group.world
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: DistributedDataParallel around `model` when there are
    several processes (gradients averaged in backward), `model` itself otherwise."""
    if not group.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_statistics(model: torch.nn.Module, group: Group) -> None:
    """Batch-norm running statistics averaged over the processes, each of which gathered them on
    its own share: what the main process evaluates and saves then stands for the whole set."""
    if not group.active:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:  # always, with track_running_stats; the attribute's type allows None
                    dist.all_reduce(buffer)
                    buffer.div_(group.world)


def check_in_step(model: torch.nn.Module, group: Group) -> None:
    """Every process must end with the same weights; one that does not means the gradients were
    not averaged, and the model the main process writes would stand for a share of the data."""
    if not group.active:
        return
    # Parameters only: batch-norm statistics are each process's own between steps (DDP hands the
    # main process's to the others at the start of every forward pass).
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode() + parameter.detach().cpu().float().numpy().tobytes())
    digests = gather(digest.hexdigest(), group)
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the training processes ended with different weights ({len(set(digests))} versions "
            f"among {group.world} processes): the gradients were not averaged"
        )
