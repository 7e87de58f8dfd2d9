"""The same GPT in PyTorch eager, timed beside minipar (``python -m minipar.bench --reference
torch``).

The reference is what a practitioner would write: ``nn.Linear``, ``nn.LayerNorm``,
``scaled_dot_product_attention`` with a causal mask, tanh-GELU, cross-entropy, gradient
clipping at norm 1 and ``torch.optim.AdamW``, on the same shapes, batch, dtype and threads as
minipar's step. Before timing, both start from minipar's initial weights and must agree on the
first loss, so the two programs are known to compute the same thing.

PyTorch is an optional extra (``pip install 'minipar[torch]'``; on Linux the CPU-only wheel
avoids gigabytes of CUDA libraries), never a dependency of the core or the tests. Without it the
command prints one line saying so.
"""

from __future__ import annotations

import time

import numpy


def load_torch():
    """The torch module, or None when it is not installed (or cannot load)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken install is as good as none here
        return None
    return torch


def build_reference(torch, cfg, weights: dict, dtype: str):
    """A PyTorch GPT with minipar's shapes and ``weights`` (name -> array, minipar's names:
    ``embed.w``, ``pos``, ``blocks.i.attn.qkv.w`` stored (in, out), ...)."""
    nn, fn = torch.nn, torch.nn.functional
    tdt = getattr(torch, dtype)

    def linear(name: str, d_in: int, d_out: int):
        layer = nn.Linear(d_in, d_out, dtype=tdt)
        with torch.no_grad():  # minipar stores W as (in, out); nn.Linear as (out, in)
            layer.weight.copy_(torch.from_numpy(numpy.ascontiguousarray(weights[name + ".w"].T)))
            if layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(weights[name + ".b"]))
        return layer

    def layernorm(name: str):
        ln = nn.LayerNorm(cfg.d_model, eps=1e-5, dtype=tdt)
        with torch.no_grad():
            ln.weight.copy_(torch.from_numpy(weights[name + ".g"]))
            ln.bias.copy_(torch.from_numpy(weights[name + ".b"]))
        return ln

    class Block(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            p = f"blocks.{i}"
            self.ln1, self.ln2 = layernorm(p + ".ln1"), layernorm(p + ".ln2")
            self.qkv = linear(p + ".attn.qkv", cfg.d_model, 3 * cfg.d_model)
            self.proj = linear(p + ".attn.proj", cfg.d_model, cfg.d_model)
            self.fc = linear(p + ".mlp.fc", cfg.d_model, cfg.ffn)
            self.out = linear(p + ".mlp.proj", cfg.ffn, cfg.d_model)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, cfg.n_heads, c // cfg.n_heads).unbind(2)
            y = fn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                v.transpose(1, 2), is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(fn.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Parameter(torch.from_numpy(weights["embed.w"].copy()))
            self.pos = nn.Parameter(torch.from_numpy(weights["pos"].copy()))
            self.blocks = nn.ModuleList(Block(i) for i in range(cfg.n_layers))
            self.ln_f = layernorm("ln_f")
            self.head = (None if cfg.tie_weights else
                         nn.Parameter(torch.from_numpy(weights["head.w"].copy())))

        def forward(self, ids, targets):
            x = self.embed[ids] + self.pos[: ids.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            w = self.embed.T if self.head is None else self.head  # (C, V)
            logits = self.ln_f(x) @ w
            return fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT()


class TorchStep:
    """One PyTorch eager training step (forward, backward, clipping at norm 1, AdamW) with
    ``threads`` intra-op threads, on the same random token stream as ``bench.step.MiniparStep``
    (seed 0); each call returns (seconds, loss)."""

    def __init__(self, torch, cfg, weights: dict, batch: int, dtype: str, threads: int,
                 lr: float = 1e-4):
        torch.set_num_threads(threads)
        self.torch, self.cfg, self.batch = torch, cfg, batch
        self.model = build_reference(torch, cfg, weights, dtype)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=0.0)
        self.rng = numpy.random.default_rng(0)

    def __call__(self) -> tuple[float, float]:
        torch, shape = self.torch, (self.batch, self.cfg.seq_len)
        x = torch.from_numpy(self.rng.integers(0, self.cfg.vocab_size, shape))
        y = torch.from_numpy(self.rng.integers(0, self.cfg.vocab_size, shape))
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - t0, loss.item()


def comparison(minipar_step: dict, torch_step: dict, tokens: int, flops_per_token: float,
               peak: float) -> dict:
    """Both steps as tokens/s and as a fraction of the measured GEMM peak, and their ratio
    (> 1: minipar is faster)."""
    out = {}
    for name, s in (("minipar", minipar_step["step_s"]), ("torch", torch_step["step_s"])):
        out[name] = {"step_s": s, "tokens_per_s": tokens / s,
                     "fraction_of_peak": flops_per_token * tokens / s / peak}
    out["speedup"] = torch_step["step_s"] / minipar_step["step_s"]
    return out


def format_comparison(cmp: dict, threads: int, version: str) -> str:
    lines = [f"{'':8s} {'step':>9s} {'tokens/s':>10s} {'of GEMM peak':>13s}"]
    for name in ("minipar", "torch"):
        r = cmp[name]
        lines.append(f"{name:8s} {r['step_s'] * 1e3:7.0f} ms {r['tokens_per_s']:10,.0f} "
                     f"{r['fraction_of_peak']:13.0%}")
    lines.append(f"minipar / PyTorch {version} eager ({threads} threads): "
                 f"{cmp['speedup']:.2f}x the tokens/s")
    return "\n".join(lines)


__all__ = ["load_torch", "build_reference", "TorchStep", "comparison",
           "format_comparison"]
