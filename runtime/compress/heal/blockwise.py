"""Stage (a): block by block. Layer ``i`` of the student runs on the output of the already-healed
compressed layers ``0..i-1`` and is trained to give the dense layer's output on the dense model's
own hidden states, so each layer also makes up for the error that reaches it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .data import Batches
from .fields import TrainableCheckpoint
from .losses import relative_mse
from .student import decoder_layers, layer_inputs, run_layer

__all__ = ["BlockStage"]


class BlockStage:
    """Hidden states of every calibration batch at the current layer, for the student and the dense model."""

    def __init__(self, teacher: nn.Module, student: nn.Module, tc: TrainableCheckpoint, batches: Batches) -> None:
        self.teacher, self.student, self.tc, self.batches = teacher, student, tc, batches
        self.path, self.t_layers = decoder_layers(teacher)
        _, self.s_layers = decoder_layers(student)
        self.layer = 0
        with torch.no_grad():
            emb = tc.weights(exclude=self.path + ".")
            xs, xd, kw = [], [], None
            for b in range(len(batches)):
                ids = batches.data[b]
                x, kw = layer_inputs(student, emb, ids)
                xs.append(x)
                xd.append(layer_inputs(teacher, None, ids)[0])
        self.kw: dict[str, Any] = kw or {}
        self.xs, self.xd = torch.stack(xs), torch.stack(xd)
        self.target = self._dense_out()

    def __len__(self) -> int:
        return len(self.t_layers)

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}."

    def _dense_out(self) -> Tensor:
        with torch.no_grad():
            return torch.stack([run_layer(self.t_layers[self.layer], None, x, self.kw) for x in self.xd])

    def loss(self, step: int) -> Tensor:
        b = self.batches.index(step, salt=self.layer + 1)
        w = self.tc.weights(self.prefix(self.layer), strip=True)
        out = run_layer(self.s_layers[self.layer], w, self.xs[b], self.kw)
        return relative_mse(out, self.target[b])

    def advance(self) -> None:
        """Move to the next layer: the student's inputs through the (healed) current layer, the dense
        inputs become the dense outputs."""
        with torch.no_grad():
            w = self.tc.weights(self.prefix(self.layer), strip=True)
            self.xs = torch.stack([run_layer(self.s_layers[self.layer], w, x, self.kw) for x in self.xs])
            self.xd = self.target
            self.layer += 1
            if self.layer < len(self):
                self.target = self._dense_out()

    def seek(self, layer: int) -> None:
        """Propagate to ``layer`` (resume): the same computation as advancing layer by layer."""
        while self.layer < layer:
            self.advance()
