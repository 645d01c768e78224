"""The DEQ Transformer language model (Bai et al. 2019; TorchDEQ zoo ``deq-lm`` / ``deq-seq``).

The model is an equilibrium over the hidden states of the current segment:

* Input: adaptive input embedding (cutoffs, ``div_val``; scaled by sqrt(d_model)), input
  dropout with one mask per sequence, then the injection ``u = injection(emb)``, one vector
  of size 3*H*Dh per token that is added to the attention's q, k and v projections.
* f(z; z_hist, u_hist): ``n_layer`` blocks. Each attends from the current segment z over
  [memory; z] with Transformer-XL relative positions (r_net on sinusoids, biases r_w / r_r,
  the rel-shift, a causal mask), then a ReLU feed-forward layer. ``deq_lm`` blocks are
  pre-LayerNorm with a LayerNorm on the attention output before o_net; ``deq_seq`` (one
  block, 1x1-conv projections and affine-free LayerNorms as upstream) is post-LN unless
  ``pre_lnorm``. Variational dropout (one mask per solve) on the attention output, the
  feed-forward layers and the attention probabilities; DEQ weight norm on f (core).
* Memory: the past fixed points z and past injections u (detached), ``mem_len`` of each,
  carried across segments; ``mem_len`` may be longer at test time.
* Output: token dropout, then the projected adaptive log-softmax with the embedding
  matrices and the tail projections tied (``AdaptiveLogSoftmax``, ours: torch's cannot tie).

`DEQTransformerLM.forward(x, y=None, mems=None)` returns ``(nll list, new mems, info)``:
the per-token negative log-likelihood (B, T) of every state the DEQ returns (the last is
the best; fixed-point correction weighs them), or the last hidden states when ``y`` is None.

Sizes (SIZES): ``deq_lm`` (3 blocks, d_model 700, 10 heads of 70, d_inner 14800),
``deq_seq`` (1 block, d_inner 48000), ``mini`` (the offline run) and ``micro`` (tests).
Parameter counts with WikiText-103's 267,735 types, cutoffs 20k/40k/200k, div_val 4:
`count_parameters` = 97,571,288 for ``deq_lm`` (each tied tensor once); TorchDEQ's zoo
reports 97.73M because its tied tail projections are separate Parameters that share
storage, which `reference_count` adds back (97,730,888).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from core.config import DEQConfig
from core.deq import get_deq
from core.norm import apply_norm, reset_norm
from core.utils import VariationalDropout, VariationalDropout1d, VariationalDropToken1d, mem_gc, reset_dropout

Mems = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LMSize:
    """Shape of a DEQ Transformer (vocabulary and cutoffs come from the data/config)."""

    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    div_val: int = 4
    variant: str = "lm"          # lm: pre-LN blocks, Linear projections | seq: upstream deq-seq block
    pre_lnorm: bool = True


SIZES = {
    "deq_lm": LMSize(3, 700, 10, 70, 14800, div_val=4, variant="lm"),
    "deq_seq": LMSize(1, 700, 10, 70, 48000, div_val=4, variant="seq", pre_lnorm=False),
    "mini": LMSize(1, 192, 4, 48, 768, div_val=2, variant="lm"),
    "micro": LMSize(1, 32, 2, 16, 64, div_val=2, variant="lm"),
}
WT103_CUTOFFS = (20000, 40000, 200000)
WT103_VOCAB = 267735


def get_size(size: str | LMSize, **overrides: Any) -> LMSize:
    """A named size (or an LMSize) with the non-null `overrides` applied."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"model.size={size!r}: use one of {', '.join(SIZES)}")
        size = SIZES[size]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(size, **changes) if changes else size


class Conv1x1(nn.Conv1d):
    """A kernel-1 Conv1d applied to (B, L, C) tensors (deq-seq's projections; weight (out, in, 1))."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class PlainLayerNorm(nn.Module):
    """LayerNorm without affine parameters (deq-seq's)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d,))


class PositionalEmbedding(nn.Module):
    """Sinusoids of the relative distances ``pos`` (descending), (L, D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model)))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(pos, self.inv_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, Lk) scores against distances k_len-1..0 -> scores against key positions.

    Query i of the segment sits at position m+i of the window (m = k_len - q_len); after the
    shift, entry [i, j] holds the score for distance m+i-j (j <= m+i; the others are masked).
    """
    b, h, q, k = x.shape
    padded = F.pad(x, (1, 0)).view(b, h, k + 1, q)
    return padded[:, :, 1:].reshape(b, h, q, k)


class RelAttention(nn.Module):
    """Relative-position multi-head attention of z over [memory; z] with the injection added to qkv."""

    def __init__(self, size: LMSize, dropout: float, dropatt: float):
        super().__init__()
        d, h, dh = size.d_model, size.n_head, size.d_head
        self.n_head, self.d_head, self.scale = h, dh, 1.0 / math.sqrt(dh)
        self.variant, self.pre_lnorm = size.variant, size.pre_lnorm
        proj = Conv1x1 if size.variant == "seq" else (lambda i, o, bias: nn.Linear(i, o, bias=bias))
        self.qkv_net = proj(d, 3 * h * dh, False)
        self.r_net = proj(d, h * dh, False)
        self.o_net = proj(h * dh, d, True)
        self.r_w_bias = nn.Parameter(torch.zeros(h, dh))
        self.r_r_bias = nn.Parameter(torch.zeros(h, dh))
        self.dropatt = VariationalDropout(dropatt)
        self.drop = VariationalDropout1d(dropout)
        if size.variant == "seq":
            self.ln = PlainLayerNorm(d)
        else:
            self.ln1 = nn.LayerNorm(d)
            self.ln2 = nn.LayerNorm(h * dh)

    def forward(self, z: torch.Tensor, z_hist: torch.Tensor, pos_emb: torch.Tensor, u: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, q_len, _ = z.shape
        h, dh = self.n_head, self.d_head
        cat = torch.cat([z_hist, z], dim=1)
        k_len = cat.shape[1]
        if self.variant == "lm":
            cat = self.ln1(cat)
        elif self.pre_lnorm:
            cat = self.ln(cat)
        heads = (self.qkv_net(cat) + u).view(b, k_len, h, 3 * dh)
        q, k, v = heads.chunk(3, dim=-1)
        q = q[:, -q_len:]
        r = self.r_net(pos_emb).view(k_len, h, dh)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        bd = rel_shift(torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r))
        score = ((ac + bd) * self.scale).masked_fill(mask, float("-inf"))
        prob = self.dropatt(torch.softmax(score, dim=-1))
        vec = torch.einsum("bhij,bjhd->bihd", prob, v).reshape(b, q_len, h * dh)
        if self.variant == "lm":
            vec = self.ln2(vec)
        out = z + self.drop(self.o_net(vec))
        if self.variant == "seq" and not self.pre_lnorm:
            out = self.ln(out)
        return out


class FeedForward(nn.Module):
    """ReLU feed-forward layer with a residual, pre-LN (or post-LN for deq-seq without pre_lnorm)."""

    def __init__(self, size: LMSize, dropout: float):
        super().__init__()
        self.ff1_net = nn.Linear(size.d_model, size.d_inner)
        self.ff2_net = nn.Linear(size.d_inner, size.d_model)
        self.drop1 = VariationalDropout1d(dropout)
        self.drop2 = VariationalDropout1d(dropout)
        self.ln = PlainLayerNorm(size.d_model) if size.variant == "seq" else nn.LayerNorm(size.d_model)
        self.post = size.variant == "seq" and not size.pre_lnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x if self.post else self.ln(x)
        out = x + self.drop2(self.ff2_net(self.drop1(F.relu(self.ff1_net(inp)))))
        return self.ln(out) if self.post else out


class DEQFunc(nn.Module):
    """f(z) = the blocks applied in turn, each block attention then feed-forward."""

    def __init__(self, size: LMSize, dropout: float, dropatt: float):
        super().__init__()
        self.dec_attn = nn.ModuleList(RelAttention(size, dropout, dropatt) for _ in range(size.n_layer))
        self.pos_ff = nn.ModuleList(FeedForward(size, dropout) for _ in range(size.n_layer))

    def forward(self, z: torch.Tensor, z_hist: torch.Tensor, u: torch.Tensor, pos_emb: torch.Tensor,
                mask: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        for attn, ff in zip(self.dec_attn, self.pos_ff):
            if checkpoint:
                z = mem_gc(attn, (z, z_hist, pos_emb, u, mask))
                z = mem_gc(ff, (z,))
            else:
                z = ff(attn(z, z_hist, pos_emb, u, mask))
        return z


def cluster_bounds(n_token: int, cutoffs: Sequence[int]) -> List[int]:
    cutoffs = list(cutoffs)
    if any(b <= a for a, b in zip([0] + cutoffs, cutoffs + [n_token])):
        raise ValueError(f"model.cutoffs={cutoffs}: must increase strictly and stay below the vocabulary "
                         f"size {n_token}")
    return [0] + cutoffs + [n_token]


class AdaptiveEmbedding(nn.Module):
    """Cluster i (ids bounds[i]..bounds[i+1]) embeds in d_embed // div_val**i dims, projected to d_proj."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int):
        super().__init__()
        self.bounds = cluster_bounds(n_token, cutoffs)
        self.d_proj, self.scale = d_proj, math.sqrt(d_proj)
        dims = [d_embed // div_val ** i for i in range(len(self.bounds) - 1)]
        self.emb_layers = nn.ModuleList(nn.Embedding(hi - lo, d) for lo, hi, d in
                                        zip(self.bounds[:-1], self.bounds[1:], dims))
        self.emb_projs = nn.ModuleList(nn.Linear(d, d_proj, bias=False) for d in dims)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = torch.zeros(flat.numel(), self.d_proj, device=ids.device, dtype=self.emb_projs[0].weight.dtype)
        for i, (emb, proj) in enumerate(zip(self.emb_layers, self.emb_projs)):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if rows.numel():
                out.index_copy_(0, rows, proj(emb(flat[rows] - lo)))
        return (out * self.scale).view(*ids.shape, self.d_proj)


class AdaptiveLogSoftmax(nn.Module):
    """Projected adaptive log-softmax (Grave et al. 2017, as in Transformer-XL), weights tied by the model.

    The head scores the shortlist (cluster 0) and one entry per tail cluster; cluster i >= 1
    is the head column ``shortlist + n_clusters - i`` (row ``n_clusters - i`` of
    ``cluster_weight``, the reference's order). Cluster i projects the hidden state with
    ``out_projs[i].weight`` (d_proj, d_i) transposed, then scores with ``out_layers[i]``.
    """

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int):
        super().__init__()
        self.bounds = cluster_bounds(n_token, cutoffs)
        self.n_clusters = len(self.bounds) - 2
        dims = [d_embed // div_val ** i for i in range(len(self.bounds) - 1)]
        self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, dims[0]))
        self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList(nn.Linear(d, hi - lo) for lo, hi, d in
                                        zip(self.bounds[:-1], self.bounds[1:], dims))
        self.out_projs = nn.ModuleList(nn.Linear(d, d_proj, bias=False) for d in dims)

    def _logits(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        weight, bias = self.out_layers[i].weight, self.out_layers[i].bias
        if i == 0 and self.n_clusters:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return F.linear(hidden @ self.out_projs[i].weight, weight, bias)

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(w | hidden) over the whole vocabulary, (..., n_token)."""
        head = F.log_softmax(self._logits(hidden, 0), dim=-1)
        short = self.bounds[1]
        parts = [head[..., :short]]
        for i in range(1, self.n_clusters + 1):
            tail = F.log_softmax(self._logits(hidden, i), dim=-1)
            parts.append(tail + head[..., short + self.n_clusters - i, None])
        return torch.cat(parts, dim=-1)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | hidden), shaped like target; tail clusters only for their rows."""
        shape = target.shape
        h = hidden.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        head = F.log_softmax(self._logits(h, 0), dim=-1)
        short = self.bounds[1]
        in_head = t < short
        nll = -head.gather(1, t.clamp(max=short - 1)[:, None]).squeeze(1) * in_head
        for i in range(1, self.n_clusters + 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            rows = ((t >= lo) & (t < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tail = F.log_softmax(self._logits(h[rows], i), dim=-1)
            lp = tail.gather(1, (t[rows] - lo)[:, None]).squeeze(1) + head[rows, short + self.n_clusters - i]
            nll = nll.index_put((rows,), -lp)
        return nll.view(shape)


class DEQTransformerLM(nn.Module):
    """The DEQ Transformer LM (module docstring). `deq` is anything `DEQConfig.from_any` reads."""

    def __init__(self, size: str | LMSize, n_token: int, cutoffs: Sequence[int], deq: Any = None,
                 dropout: float = 0.05, dropatt: float = 0.0, mem_len: int = 150, mem_gc: bool = False,
                 init_std: float = 0.01):
        super().__init__()
        self.size = size = get_size(size)
        self.n_token, self.cutoffs = n_token, list(cutoffs)
        self.mem_len, self.mem_gc = int(mem_len), bool(mem_gc)
        d = size.d_model
        self.word_emb = AdaptiveEmbedding(n_token, d, d, cutoffs, size.div_val)
        self.pos_emb = PositionalEmbedding(d)
        inject_dim = 3 * size.n_head * size.d_head
        if size.variant == "seq":   # upstream's names: deq-seq's inject_conv, deq-lm's injection
            self.inject_conv = Conv1x1(d, inject_dim)
        else:
            self.injection = nn.Linear(d, inject_dim)
        self.func = DEQFunc(size, dropout, dropatt)
        self.iodrop = VariationalDropout1d(dropout)       # one mask per sequence over channels
        self.pos_drop = VariationalDropout1d(dropout)
        self.out_drop = VariationalDropToken1d(dropout)   # drops whole tokens before the softmax
        self.crit = AdaptiveLogSoftmax(n_token, d, d, cutoffs, size.div_val)
        self._init_weights(init_std)
        for i in range(len(self.crit.out_layers)):       # tied embeddings; tail projections tied
            self.crit.out_layers[i].weight = self.word_emb.emb_layers[i].weight
            if i > 0:
                self.crit.out_projs[i].weight = self.word_emb.emb_projs[i].weight
        self.deq_config = DEQConfig.from_any(deq)
        apply_norm(self.func, args=self.deq_config)
        self.deq = get_deq(self.deq_config)

    def _init_weights(self, std: float) -> None:
        """N(0, std) weights (LayerNorm weights N(1, std)), zero biases: the reference's init."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("bias") and "r_" not in name.rsplit(".", 1)[-1]:
                nn.init.zeros_(p)
            elif ".ln" in name:
                nn.init.normal_(p, 1.0, std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def injection_net(self) -> nn.Module:
        return self.inject_conv if self.size.variant == "seq" else self.injection

    def init_mems(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Mems:
        s = self.size
        return (torch.zeros(batch, 0, s.d_model, device=device, dtype=dtype),
                torch.zeros(batch, 0, 3 * s.n_head * s.d_head, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mems: Optional[Mems] = None,
                mem_len: Optional[int] = None, solver_kwargs: Optional[dict] = None
                ) -> Tuple[List[torch.Tensor], Mems, dict]:
        b, q_len = x.shape
        if mems is None or mems[0].shape[0] != b:
            mems = self.init_mems(b, x.device)
        z_hist, u_hist = mems
        m_len = z_hist.shape[1]
        k_len = m_len + q_len
        reset_norm(self.func)
        reset_dropout(self)
        u_now = self.injection_net(self.iodrop(self.word_emb(x)))
        u_cat = torch.cat([u_hist, u_now], dim=1)
        pos = torch.arange(k_len - 1, -1, -1.0, device=x.device)
        pos_emb = self.pos_drop(self.pos_emb(pos)[None])[0]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).triu(1 + m_len)
        checkpoint = self.mem_gc and self.training and torch.is_grad_enabled()

        def f(z):
            return self.func(z, z_hist, u_cat, pos_emb, mask, checkpoint)

        z0 = torch.zeros(b, q_len, self.size.d_model, device=x.device, dtype=u_now.dtype)
        states, info = self.deq(f, z0, solver_kwargs=solver_kwargs)
        self._last_solve = ((z_hist, u_cat, pos_emb, mask), states[-1])
        keep = self.mem_len if mem_len is None else int(mem_len)
        with torch.no_grad():
            new_mems = (torch.cat([z_hist, states[-1]], 1)[:, max(0, k_len - keep):].detach(),
                        u_cat[:, max(0, k_len - keep):].detach())
        if y is None:
            return states, new_mems, info
        return [self.crit(self.out_drop(z), y) for z in states], new_mems, info

    def last_equilibrium(self) -> tuple:
        """(f, z*) of the last forward, for `core.reg.jac_loss` (IFT + JR).

        This f never checkpoints (`mem_gc` is once-differentiable; the Jacobian term needs
        a second derivative).
        """
        inputs, z_star = self._last_solve
        return (lambda z: self.func(z, *inputs, checkpoint=False)), z_star


def count_parameters(module: nn.Module) -> int:
    """Parameters, each tied tensor once."""
    return sum(p.numel() for p in module.parameters())


def reference_count(model: DEQTransformerLM) -> int:
    """The count TorchDEQ's zoo prints: its tail projections i >= 1 are separate tied Parameters."""
    return count_parameters(model) + sum(p.weight.numel() for p in model.crit.out_projs[1:])
