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
        rnn = model.rnn
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
        if self.arch == "lstm":
            h, c = state
            hs, cs = [], []
            x = self.table[ids]  # layer 0's input projection, its biases included (B, 4H)
            for layer in range(self.num_layers):
                pre = x if layer == 0 else torch.addmm(self.b[layer], x, self.w_in[layer - 1])
                gates = pre.addmm_(h[layer], self.w_hh[layer])  # (B, 4H)
                i, f, g, o = gates.chunk(4, dim=1)
                cl = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
                x = torch.sigmoid(o) * torch.tanh(cl)
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
                r_i, z_i, n_i = pre.chunk(3, dim=1)
                r_h, z_h, n_h = hn.chunk(3, dim=1)
                r = torch.sigmoid(r_i + r_h)
                z = torch.sigmoid(z_i + z_h)
                n = torch.tanh(n_i + r * n_h)
                x = (1 - z) * n + z * h[layer]
            out.append(x)
        return torch.addmm(self.head_b, x, self.head_w), torch.stack(out)
