"""Train a small GPT (the book's chapter 4 architecture) on input embeddings from the pipeline.

Run from the project root:

    python examples/train_gpt.py --steps 100                          # data/sample/*.txt, CPU-sized
    python examples/train_gpt.py --data ../shared/data/the-verdict.txt --steps 50 --checkpoint run.pt
    python examples/train_gpt.py --data ../shared/data/the-verdict.txt --steps 100 --resume run.pt

The model has no embedding tables: the pipeline's embed stage computes ``tok_emb + pos_emb`` on the
device, and those tables train with the model (``pipe.embedding``'s parameters are in the optimizer).
The corpus (the files in order, as one text) is split as in the book's chapter 5: its first 90% of
bytes trains, the rest validates (cut at a point where BPE cannot tell). The two parts are held in
memory as shard units of ``--piece-bytes`` (``TextPieces``), so ranks can share them out; a
``split`` stage will replace this. Every ``--eval-every`` steps it prints
``step=<n> train_loss=<mean since the last line> val_loss=<y>``, and beside it the time the loop
waited for data (``pipe.metrics()``): ``step=<n> data_wait_ms=<per step> data_wait_share=<of the
time>``, both since the previous line. A checkpoint holds the model, the tables, the optimizer and
the pipeline's ``state_dict()``: a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline import Pipeline  # noqa: E402
from pipeline.shard import ShardedSource  # noqa: E402
from pipeline.stage import Stage  # noqa: E402
from pipeline.storage import expand_paths  # noqa: E402
from stages import Batch, BpeEncode, Embed, Pack, SlidingWindow  # noqa: E402
from stages.read_text import next_cut  # noqa: E402

VOCAB_SIZE = 50257  # GPT-2 BPE
MUST_MATCH = (
    "data", "val_fraction", "piece_bytes", "emb_dim", "layers", "heads", "context", "batch", "seed",
    "pack", "remainder",
)

# --- the model: the book's chapter 4 GPTModel, less its embedding tables --------------------------


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), GELU(), nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"--emb-dim {d_out} must be divisible by --heads {num_heads}")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention (the book's); with ``mask`` (``document_mask``), only within each document."""
        b, num_tokens, _ = x.shape
        split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        keys, queries, values = split(self.W_key(x)), split(self.W_query(x)), split(self.W_value(x))
        if mask is not None:
            p = self.dropout.p if self.training else 0.0
            context = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=p)
            return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))
        attn_scores = queries @ keys.transpose(2, 3)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)  # causal
        attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, emb_dim: int, context_length: int, heads: int, dropout: float):
        super().__init__()
        self.att = MultiHeadAttention(emb_dim, emb_dim, context_length, dropout, heads)
        self.ff = FeedForward(emb_dim)
        self.norm1, self.norm2 = LayerNorm(emb_dim), LayerNorm(emb_dim)
        self.drop_shortcut = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPT(nn.Module):
    """The book's ``GPTModel`` from the input embeddings on: dropout, blocks, final norm, ``out_head``."""

    def __init__(
        self,
        emb_dim: int,
        layers: int,
        heads: int,
        context_length: int,
        dropout: float = 0.0,
        vocab_size: int = VOCAB_SIZE,
    ):
        super().__init__()
        self.drop_emb = nn.Dropout(dropout)
        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(emb_dim, context_length, heads, dropout) for _ in range(layers)]
        )
        self.final_norm = LayerNorm(emb_dim)
        self.out_head = nn.Linear(emb_dim, vocab_size, bias=False)

    def forward(self, embeddings: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; with ``position_ids`` (packed rows), each token attends only within its document."""
        mask = None if position_ids is None else document_mask(position_ids)
        x = self.drop_emb(embeddings)
        for block in self.trf_blocks:
            x = block(x, mask)
        return self.out_head(self.final_norm(x))


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True: may attend) from ``position_ids`` [B, T].

    A document or piece starts where its position is 0 (``cu_seqlens`` holds the same starts,
    flattened); query ``q`` sees key ``k <= q`` of the same one. Rows without restarts give the plain
    causal mask.
    """
    t = position_ids.shape[-1]
    document = (position_ids == 0).cumsum(-1)
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --- the data: a 90/10 split of the corpus, as shard units held in memory ------------------------


def split_corpus(paths: str | list[str], val_fraction: float) -> tuple[list, list]:
    """``(train, val)`` documents ``(file, offset, bytes)``: the first ``1 - val_fraction`` of the bytes,
    and the rest."""
    train, val = [], []
    files = [(path, Path(path).read_bytes()) for path in expand_paths(paths)]
    left = int(sum(len(raw) for _, raw in files) * (1 - val_fraction))  # train bytes still to take
    for path, raw in files:
        cut = len(raw) if left >= len(raw) else 0 if left <= 0 else next_cut(raw, left)
        cut = len(raw) if cut < 0 else cut
        if cut > 0:
            train.append((path, 0, raw[:cut]))
        if cut < len(raw):
            val.append((path, cut, raw[cut:]))
        left -= len(raw)
    if not train or not val:
        raise SystemExit(f"{paths}: too little text for a {1 - val_fraction:.0%}/{val_fraction:.0%} split")
    return train, val


class TextPieces(ShardedSource, Stage[dict]):
    """Documents held in memory, as shard units of about ``piece_bytes`` cut where BPE cannot tell.

    Items are ``read_text``'s: ``text``, ``source``, ``offset``, ``end``. Ranks (from torch.distributed)
    and workers take disjoint units (``pipeline.shard``); ``read_log`` lists the units read, in order.

    Args:
        docs: ``(source, offset, bytes)``: the text, and where it starts in its file.
        piece_bytes: about how many bytes a unit holds (more where no cut point comes sooner).
        rank, world_size: this process's place among the ranks (default: torch.distributed's).
    """

    type_name = "text_pieces"

    def __init__(
        self,
        docs: list[tuple[str, int, bytes]],
        piece_bytes: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.docs = docs
        self.read_log: list[list] = []  # [source, offset, end] of each unit read (examples/ddp.py prints them)
        self.units = []  # [doc index, start, end], bytes of the doc
        for i, (_, _, raw) in enumerate(docs):
            start = 0
            while start < len(raw):
                end = next_cut(raw, start + piece_bytes) if start + piece_bytes < len(raw) else -1
                end = len(raw) if end < 0 else end
                self.units.append([i, start, end])
                start = end
        self.init_shards(rank, world_size, shuffle=False, seed=0)

    def read(self, unit: list[int], position: int | None) -> tuple[dict, int] | None:
        if position is not None:
            return None  # a unit is one item
        i, start, end = unit
        source, offset, raw = self.docs[i]
        self.stats["bytes"] += end - start
        self.read_log.append([source, offset + start, offset + end])
        return {
            "text": raw[start:end].decode("utf-8"),
            "source": source,
            "offset": offset + start,
            "end": offset + end,
        }, end

    def close_unit(self) -> None:
        pass


def make_pipeline(docs: list, args: argparse.Namespace, train: bool) -> Pipeline:
    """Windows of ``--context`` tokens, stride ``--context`` (the book's chapter 5). Training: this rank's
    share of the text, windows shuffled within each batch (a checkpoint inside a larger shuffle group could
    not resume on another number of ranks), batches embedded by the embed stage. Validation: all of the text
    on every rank, batches left for the training tables (``evaluate``)."""
    node = (
        TextPieces(docs, piece_bytes=args.piece_bytes)
        if train
        else TextPieces(docs, args.piece_bytes, rank=0, world_size=1)
    )
    node = BpeEncode(node, encoding="gpt2")
    if args.pack:  # rows that start at documents; attention stays inside each (GPT.forward)
        node = Pack(node, max_length=args.context, policy=args.pack, remainder=args.remainder)
    else:
        node = SlidingWindow(node, max_length=args.context, stride=args.context)
    node = Batch(node, args.batch, drop_last=train, shuffle=train, seed=args.seed, shuffle_windows=args.batch)
    if train:
        node = Embed(
            node,
            vocab_size=VOCAB_SIZE,
            d_model=args.emb_dim,
            context_length=args.context,
            device=args.device,
            seed=args.seed,
        )
    return Pipeline(node)


def batches(pipe: Pipeline):
    """The pipeline's batches, epoch after epoch."""
    while True:
        empty = True
        for batch in pipe:
            empty = False
            yield batch
        if empty:
            raise SystemExit(
                f"the training text gives no full batch of {pipe!r}: use more text or a smaller --batch/--context"
            )


@torch.no_grad()
def evaluate(model: nn.Module, embedding: nn.Module, val: Pipeline, max_batches: int) -> float:
    """Mean loss over the first ``max_batches`` validation batches, embedded with the training tables."""
    device = next(embedding.parameters()).device
    model.eval()
    losses = []
    for b in islice(val, max_batches):
        position_ids = b["position_ids"].to(device) if "position_ids" in b else None
        logits = model(embedding(b["inputs"].to(device), position_ids), position_ids)
        losses.append(loss_of(logits, b["targets"].to(device)).item())
    model.train()
    if not losses:
        raise SystemExit(f"the validation text gives no window of {val!r}: use more text or a smaller --context")
    return sum(losses) / len(losses)


def packing_line(stats) -> str:
    """Tokens used vs cropped (and padded) by the pack stage in this epoch so far."""
    used, cropped, padded = stats["tokens_packed"], stats["tokens_cropped"], stats["padding_tokens"]
    total = max(used + cropped + padded, 1)
    return (f"pack tokens_used={used} ({used / total:.1%}) tokens_cropped={cropped} ({cropped / total:.1%}) "
            f"padding={padded} ({padded / total:.1%})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/sample/*.txt", help="text files or a glob (default: %(default)s)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="the corpus's last fraction of bytes, for validation"
    )
    p.add_argument("--piece-bytes", type=int, default=4096, help="bytes per shard unit")
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--context", type=int, default=32, help="tokens per window (and position-table rows)")
    p.add_argument("--pack", nargs="?", const="best_fit", choices=["best_fit", "greedy"],
                   help="pack documents into rows (policy, default best_fit) instead of sliding windows")
    p.add_argument("--remainder", default="drop", choices=["drop", "keep"], help="with --pack: a cropped tail's fate")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in all (a resumed run goes on to this step)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--checkpoint", help="save model, tables, optimizer and pipeline state here (at each evaluation)")
    p.add_argument("--resume", help="a checkpoint to go on from")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[GPT, Pipeline, Pipeline]:
    """The model (seeded by ``--seed``) and the training and validation pipelines."""
    train_docs, val_docs = split_corpus(args.data, args.val_fraction)
    pipe, val = make_pipeline(train_docs, args, train=True), make_pipeline(val_docs, args, train=False)
    torch.manual_seed(args.seed)
    model = GPT(args.emb_dim, args.layers, args.heads, args.context, args.dropout).to(
        pipe.embedding.tok_emb.weight.device
    )
    return model, pipe, val


def save(
    path: str,
    step: int,
    model: nn.Module,
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    data: list | None = None,
) -> None:
    """``data``: under DDP, every rank's pipeline state, by rank (default: this pipeline's state)."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "embedding": pipe.embedding.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": pipe.state_dict() if data is None else data,
        "args": {key: getattr(args, key) for key in MUST_MATCH},
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash while saving keeps the previous checkpoint


def restore(
    path: str,
    model: nn.Module,
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Load a checkpoint; return its step. Settings that shape the data or the model must match.

    A checkpoint of ``ddp.py`` holds one pipeline state per rank: this rank's is loaded, or, saved on
    another number of ranks, all of them with ``reshard=True``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in MUST_MATCH:
        if state["args"][key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"--resume {path}: {flag} was {state['args'][key]!r}, now {getattr(args, key)!r}")
    model.load_state_dict(state["model"])
    pipe.embedding.load_state_dict(state["embedding"])
    optimizer.load_state_dict(state["optimizer"])
    data = state["data"] if isinstance(state["data"], list) else [state["data"]]
    if len(data) == world_size:
        pipe.load_state_dict(data[rank])  # the same ranks: exactly the batches that came next
    else:
        pipe.load_state_dict(data, reshard=True)  # every old rank's state, dealt out over these ranks
        if rank == 0:
            print(f"resumed at step {state['step']}, saved by {len(data)} rank(s), on {world_size}", flush=True)
    return state["step"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, pipe, val = build(args)
    embedding = pipe.embedding
    parameters = [*model.parameters(), *embedding.parameters()]  # the tables train with the model
    optimizer = torch.optim.AdamW(
        parameters, lr=args.lr, weight_decay=args.weight_decay, fused=True
    )  # fused: 10x faster on a CPU
    step = restore(args.resume, model, pipe, optimizer, args) if args.resume else 0
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(
        f"model {count(model):,} parameters, tables {count(embedding):,}, device {embedding.tok_emb.weight.device}, "
        f"from step {step}",
        flush=True,
    )
    data, losses, started, first = batches(pipe), [], time.perf_counter(), step
    while step < args.steps:
        batch = next(data)
        loss = loss_of(model(batch["embeddings"], batch.get("position_ids")), batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.detach())  # no .item() here: it would make the host wait for the device every step
        if step == 1 or step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, embedding, val, args.eval_batches)
            print(f"step={step} train_loss={torch.stack(losses).mean().item():.6f} val_loss={val_loss:.6f}", flush=True)
            if args.pack:
                print(packing_line(pipe.stages["pack"].stats), flush=True)
            waited = pipe.metrics()  # since the previous line: is the model waiting for data?
            print(f"step={step} data_wait_ms={1000 * waited['data_wait_s'] / len(losses):.2f} "
                  f"data_wait_share={waited['data_wait_share']:.3f}", flush=True)
            losses = []
            if args.checkpoint:
                save(args.checkpoint, step, model, pipe, optimizer, args)
    seconds = time.perf_counter() - started
    per_step = 1000 * seconds / max(step - first, 1)
    print(f"trained steps {first + 1}..{step} in {seconds:.1f} s ({per_step:.0f} ms/step with evaluation)")


if __name__ == "__main__":
    main()
