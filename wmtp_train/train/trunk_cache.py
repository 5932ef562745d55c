"""Stage 1 on a frozen trunk, cached (``stage1.cache_trunk_states``): the trunk's states at the completion
tokens of every training record, computed once, so that a step runs only the value head.

A value head fitted on a frozen trunk needs far more record draws than the trunk can be re-run for on a
small machine (README, "Why the critic does not learn"); with the states cached a step costs the value
head alone. The states are computed in index order in fixed batches, on every rank alike (each rank's
sampler may draw any record, and every rank must enter the sharded trunk's collectives together), so a
resumed run rebuilds exactly the same cache.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from wmtp_train.model import MTPTransformer
from wmtp_train.train.inputs import TrainingData


class TrunkStateCache:
    """Per training record, the trunk's states [completion tokens, d] (collective to build).

    Args:
        model: the model, its trunk frozen.
        data: the run's inputs; every record of ``data.train`` is cached.
        batch_size: records per trunk forward while building.
    """

    def __init__(self, model: MTPTransformer, data: TrainingData, batch_size: int):
        self.states: list[torch.Tensor] = []
        n = len(data.train)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = data.batch(range(start, min(start + batch_size, n)))
                hidden = model.trunk_forward(batch["input_ids"], batch["attention_mask"]).hidden
                completion = batch["loss_mask"].bool()
                self.states += [hidden[row][completion[row]].clone() for row in range(hidden.shape[0])]

    @property
    def nbytes(self) -> int:
        """Bytes the cached states hold."""
        return sum(s.numel() * s.element_size() for s in self.states)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached states of records ``indices``, zero-padded: ``([B, L, d], [B, L] completion mask)``,
        L the longest completion among them.

        Args:
            indices: [B] record indices into the training set.
        """
        rows = [self.states[int(i)] for i in indices.tolist()]
        hidden = pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows], device=hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
        return hidden, mask.long()
