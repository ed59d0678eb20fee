"""FusedStep: one decoding step of a CharRNN as a few addmm calls on pre-arranged weights.

Equal to `CharRNN.forward` on a length-1 input (within float rounding) and several times
faster on a CPU: no per-call RNN setup, the embedding folded into layer 0's input projection
(a table lookup), and each layer's input and hidden projections in one matmul where the cell
allows it. Inference only: it snapshots the weights when built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.nn.model import CharRNN, State


class FusedStep:
    def __init__(self, model: CharRNN) -> None:
        c = model.config
        self.arch = c.arch
        self.num_layers = c.num_layers
        self.hidden = H = c.hidden_size
        rnn = model.rnn
        # LSTM gates reordered from torch's (i, f, g, o) to (i, f, o, g): one sigmoid for the first three
        order = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        with torch.no_grad():
            emb = model.embed.weight  # (V, E)
            self.w_in: list[Tensor] = []  # layer >= 1: (H, G) input projection, transposed
            self.w_hh: list[Tensor] = []  # (H, G) hidden projection, transposed
            self.b: list[Tensor] = []  # (G,) biases added to the input projection
            self.b_hh: list[Tensor] = []  # GRU: (3H,) hidden bias, kept apart for the candidate gate
            for layer in range(c.num_layers):
                w_ih = getattr(rnn, f"weight_ih_l{layer}")
                w_hh = getattr(rnn, f"weight_hh_l{layer}")
                b_ih = getattr(rnn, f"bias_ih_l{layer}")
                b_hh = getattr(rnn, f"bias_hh_l{layer}")
                if c.arch == "lstm":
                    w_ih, w_hh, b_ih, b_hh = (t[order] for t in (w_ih, w_hh, b_ih, b_hh))
                self.w_hh.append(w_hh.t().contiguous())
                if c.arch == "gru":  # the candidate gate needs W_hn h + b_hn on its own
                    self.b.append(b_ih.clone())
                    self.b_hh.append(b_hh.clone())
                else:
                    self.b.append((b_ih + b_hh).clone())
                if layer == 0:
                    self.table = torch.addmm(self.b[0], emb, w_ih.t()).contiguous()  # (V, G)
                else:
                    self.w_in.append(w_ih.t().contiguous())
            self.head_w = model.head.weight.t().contiguous()  # (H, V)
            self.head_b = model.head.bias.detach().clone()

    @torch.inference_mode()
    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> logits (B, V) and the next state; state as for CharRNN (batch dim 1)."""
        H = self.hidden
        if self.arch == "lstm":
            h, c = state
            hs, cs = [], []
            x = self.table[ids]  # layer 0's input projection, its biases included (B, 4H)
            for layer in range(self.num_layers):
                pre = x if layer == 0 else torch.addmm(self.b[layer], x, self.w_in[layer - 1])
                ifo, g = pre.addmm_(h[layer], self.w_hh[layer]).split([3 * H, H], dim=1)  # (B, 3H), (B, H)
                i, f, o = torch.sigmoid(ifo).split(H, dim=1)
                cl = f * c[layer] + i * torch.tanh(g)
                x = o * torch.tanh(cl)
                hs.append(x)
                cs.append(cl)
            return torch.addmm(self.head_b, x, self.head_w), (torch.stack(hs), torch.stack(cs))
        h = state  # (L, B, H)
        assert isinstance(h, Tensor)
        out = []
        x = self.table[ids]
        for layer in range(self.num_layers):
            pre = x if layer == 0 else torch.addmm(self.b[layer], x, self.w_in[layer - 1])
            if self.arch == "rnn":
                x = torch.tanh(pre.addmm_(h[layer], self.w_hh[layer]))
            else:
                hn = torch.addmm(self.b_hh[layer], h[layer], self.w_hh[layer])  # (B, 3H)
                rz_i, n_i = pre.split([2 * H, H], dim=1)
                rz_h, n_h = hn.split([2 * H, H], dim=1)
                r, z = torch.sigmoid(rz_i + rz_h).split(H, dim=1)
                n = torch.tanh(n_i + r * n_h)
                x = n + z * (h[layer] - n)
            out.append(x)
        return torch.addmm(self.head_b, x, self.head_w), torch.stack(out)
