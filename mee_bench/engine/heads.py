"""Trainable exit heads: CALM's state classifier and MEE's last-three MLP and LSTM.

Each head maps decoder states to two logits (stay, exit); P(exit) is the confidence.
They read raw layer outputs (before the final norm), with the decoder input embedding
standing in as "layer 0" when a head looks further back than layer 1.
Saved as one safetensors file beside the model so a checkpoint and its heads travel together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HEADS_FILE = "exit_heads.safetensors"


class StateClassifier(nn.Module):
    """CALM: an MLP on the current state h_i."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state)


class LastThreeMLP(nn.Module):
    """MEE: [h_(i-2), h_(i-1), h_i] (3*d_model) -> d_model -> ReLU -> 2."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, 2))

    def forward(self, last_three: Tensor) -> Tensor:
        return self.net(last_three)


class LayerLSTM(nn.Module):
    """MEE: a 2-layer LSTM that reads h_1..h_i one layer at a time, then a linear map to 2 outputs.

    The recurrent state is carried across layers by the caller, so each layer costs one step.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_model, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, states: Tensor, carry: tuple[Tensor, Tensor] | None = None):
        """states [B, steps, d] -> (logits [B, steps, 2], carry). Used for training."""
        output, carry = self.lstm(states, carry)
        return self.out(output), carry

    def step(
        self, state: Tensor, carry: list[tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One layer's state [B, d] -> (logits [B, 2], carry): `forward`'s maths for one step with
        the same weights, through `torch.lstm_cell`, which costs a third of nn.LSTM per call."""
        lstm = self.lstm
        if carry is None:
            zeros = state.new_zeros(state.shape[0], lstm.hidden_size)
            carry = [(zeros, zeros)] * lstm.num_layers
        weights = lstm.all_weights
        new_carry, x = [], state
        for (hidden, cell), (w_ih, w_hh, b_ih, b_hh) in zip(carry, weights):
            hidden, cell = torch.lstm_cell(x, (hidden, cell), w_ih, w_hh, b_ih, b_hh)
            new_carry.append((hidden, cell))
            x = hidden
        return self.out(x), new_carry


class ExitHeads(nn.Module):
    """The three learned measures' heads for one model, stored together."""

    def __init__(self, d_model: int, classifier_hidden: int = 64, lstm_hidden: int = 64) -> None:
        super().__init__()
        self.d_model, self.classifier_hidden, self.lstm_hidden = d_model, classifier_hidden, lstm_hidden
        self.classifier = StateClassifier(d_model, classifier_hidden)
        self.last_three_mlp = LastThreeMLP(d_model)
        self.lstm = LayerLSTM(d_model, lstm_hidden)
        self.metadata: dict = {}  # what the heads file records about their training (e.g. num_layers)

    def dims(self) -> dict[str, int]:
        return {"d_model": self.d_model, "classifier_hidden": self.classifier_hidden, "lstm_hidden": self.lstm_hidden}

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write the heads file whole or not at all (a temp file moved into place), so a run killed
        while saving leaves the previous heads, never half a file."""
        path = Path(directory) / HEADS_FILE
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        header = {"dims": json.dumps(self.dims()), "metadata": json.dumps(metadata or {})}
        partial = path.with_name(f".{HEADS_FILE}.{os.getpid()}.tmp")
        save_file(tensors, str(partial), metadata=header)
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExitHeads":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / HEADS_FILE
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
        heads = cls(**json.loads(header["dims"]))
        heads.metadata = json.loads(header.get("metadata") or "{}")
        heads.load_state_dict(load_file(str(path)))
        return heads.eval()


def find_heads(model_dir: str | Path | None, heads: str | Path | None = None) -> Path | None:
    """The heads file to use: an explicit path, else the one saved beside the model (a local
    directory; a hub id has none), else None."""
    if heads is not None:
        path = Path(heads)
        path = path / HEADS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"exit heads not found at {path}; train them with `mee-bench train-heads MODEL`")
        return path
    beside = Path(model_dir).expanduser() / HEADS_FILE if model_dir is not None else None
    return beside if beside is not None and beside.is_file() else None
