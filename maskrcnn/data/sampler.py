"""Batches of dataset indices for training: a fresh seeded shuffle every
epoch, split between the processes of a distributed job, endless, and able
to start in the middle of a run (resume) without loading what it skips."""

from __future__ import annotations

from typing import Iterator, List

from torch.utils.data import DistributedSampler, Sampler


class EpochBatchSampler(Sampler[List[int]]):
    """``DataLoader(dataset, batch_sampler=EpochBatchSampler(...))``.

    Epoch e is torch's ``DistributedSampler`` order for (seed, e) (the same
    permutation on every rank, each rank taking its own share; samples
    that do not divide evenly are left out), cut into batches of
    ``batch_size`` (an incomplete last batch is left out too, so every step
    of every rank has a full batch). Iteration never ends: the training
    loop counts its steps.

    Args:
        dataset_size: number of samples.
        batch_size: samples per batch of each process.
        seed: the shuffle's seed; the same on every rank.
        rank, world_size: this process's share.
        start_batch: batches to skip (a resumed run passes the number of
            steps already taken); no sample is read for them.
    """

    def __init__(
        self, dataset_size: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.batches_per_epoch = (dataset_size // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"a dataset of {dataset_size} samples gives no full batch of {batch_size} per process "
                f"with {world_size} process(es): use a smaller batch size or more data"
            )

    def epoch_order(self, epoch: int) -> List[int]:
        """This rank's sample indices of ``epoch``, in order."""
        sampler = DistributedSampler(
            range(self.dataset_size), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[List[int]]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for batch in range(skip, self.batches_per_epoch):
                yield order[batch * self.batch_size : (batch + 1) * self.batch_size]
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        """Batches per epoch (the iteration itself is endless)."""
        return self.batches_per_epoch


__all__ = ["EpochBatchSampler"]
