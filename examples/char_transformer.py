"""A small character-level transformer trained on Python's own standard library, three ways.

The text is the source of the standard library modules that ship with every Python (nothing
is downloaded). Each optimizer trains the same model from the same initialization on the same
batches twice: with funcopt (a pure training step) and with torch.optim (``loss.backward();
opt.step()``). The loss curves must agree; the script fails if they drift apart.

    python examples/char_transformer.py            # 300 steps per run, ~2 minutes on 2 cores
    python examples/char_transformer.py --fast     # 30 steps (what CI runs)

Optimizers: AdamW; Muon for the hidden matrices with AdamW for the embedding, the head, the
biases and the norms (the standard Muon recipe, built with ``funcopt.multi_transform``); and
Adafactor. The curves are saved to ``char_transformer.png`` (in ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

import funcopt

MODULES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "inspect.py", "pathlib.py")


def load_text(max_bytes: int) -> torch.Tensor:
    """Bytes of some standard-library sources (the same on every machine with this Python)."""
    root = os.path.dirname(os.__file__)
    data = b"".join(pathlib.Path(root, name).read_bytes() for name in MODULES if pathlib.Path(root, name).exists())
    if not data:
        sys.exit(f"no standard-library sources found under {root}")
    return torch.tensor(list(data[:max_bytes]), dtype=torch.long)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def moving_average(curve: list[float], window: int = 25) -> list[float]:
    window = min(window, len(curve))
    return [sum(curve[i : i + window]) / window for i in range(len(curve) - window + 1)]


def batches(data: torch.Tensor, steps: int, batch: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(context + 1)
        out.append((data[idx[:, :-1]], data[idx[:, 1:]]))
    return out


def is_hidden_matrix(path: str, leaf: torch.Tensor) -> bool:
    """Muon's leaves: the 2-D weights inside the blocks (not the embedding, head or position table)."""
    return leaf.ndim == 2 and path.startswith("blocks.")


def funcopt_optimizer(name: str, params: dict[str, torch.Tensor]) -> funcopt.GradientTransformation:
    if name == "adamw":
        return funcopt.adamw(3e-3, weight_decay=0.01)
    if name == "adafactor":
        return funcopt.adafactor(1e-2)
    labels = {path: "muon" if is_hidden_matrix(path, leaf) else "adamw" for path, leaf in params.items()}
    return funcopt.multi_transform(
        {"muon": funcopt.muon(0.02, weight_decay=0.01), "adamw": funcopt.adamw(3e-3, weight_decay=0.01)}, labels
    )


def torch_optimizers(name: str, model: nn.Module) -> list[torch.optim.Optimizer]:
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)]
    if name == "adafactor":
        return [torch.optim.Adafactor(model.parameters(), lr=1e-2)]
    named = dict(model.named_parameters())
    hidden = [p for n, p in named.items() if is_hidden_matrix(n, p)]
    rest = [p for n, p in named.items() if not is_hidden_matrix(n, p)]
    return [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01), torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01)]


def train_funcopt(model: nn.Module, name: str, data: list) -> list[float]:
    params, buffers = funcopt.nn.extract(model, copy=True)

    def loss_fn(params, x, y):
        logits = funcopt.nn.apply(model, params, buffers, x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    tx = funcopt_optimizer(name, params)
    step = funcopt.make_step(loss_fn, tx)
    state = tx.init(params)
    losses = []
    for x, y in data:
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    return losses


def train_torch(model: nn.Module, name: str, data: list) -> list[float]:
    opts = torch_optimizers(name, model)
    losses = []
    for x, y in data:
        for opt in opts:
            opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="30 steps (for CI)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="directory for the plot")
    args = parser.parse_args()
    steps = 30 if args.fast else args.steps
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = batches(load_text(400_000), steps, batch=16, context=64)
    curves: dict[str, tuple[list[float], list[float]]] = {}
    failures = []
    for name in ("adamw", "muon+adamw", "adafactor"):
        torch.manual_seed(0)  # the same initialization for every optimizer
        base = CharTransformer()
        ours = train_funcopt(copy.deepcopy(base), name, data)
        theirs = train_torch(copy.deepcopy(base), name, data)
        curves[name] = (ours, theirs)
        # Both runs do the same arithmetic up to float rounding; training amplifies a last-bit
        # difference (Muon's Newton-Schulz runs in bfloat16, as torch's does), so the curves are
        # compared step by step at the start and as moving averages over the whole run.
        early = max(abs(a - b) for a, b in zip(ours[:20], theirs[:20]))
        smooth = max(abs(a - b) for a, b in zip(moving_average(ours), moving_average(theirs)))
        print(f"{name:11s} loss {ours[0]:.3f} -> {ours[-1]:.3f} (funcopt), {theirs[-1]:.3f} (torch.optim); "
              f"gap over the first 20 steps {early:.1e}, between the moving averages {smooth:.1e}")
        if early > 1e-3 or smooth > 2e-2:
            failures.append(f"{name}: the funcopt and torch.optim curves differ ({early:.1e} early, {smooth:.1e} smoothed)")
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'funcopt[plot]')")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (ours, theirs) in curves.items():
            line = ax.plot(ours, label=f"funcopt {name}")[0]
            ax.plot(theirs, "--", color=line.get_color(), label=f"torch.optim {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (bytes)")
        ax.legend()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "char_transformer.png", dpi=110, bbox_inches="tight")
        print(f"saved {args.out / 'char_transformer.png'}")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()
