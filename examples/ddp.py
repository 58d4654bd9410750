"""``train_gpt.py`` under DistributedDataParallel, on CPU with gloo (or on GPUs with nccl).

Run from the project root:

    torchrun --standalone --nproc_per_node 2 examples/ddp.py --data ../shared/data/the-verdict.txt \
        --piece-bytes 1024 --steps 20

Every rank builds the same model and pipelines (``train_gpt.build``). The training reader takes its
rank and world size from torch.distributed, so the ranks read disjoint pieces of the training text;
each rank evaluates all of the validation text. The model and the embed stage's tables are one
module (``Trainable``) wrapped in DDP: the tables are used in the pipeline, before DDP's forward, and
their gradients are all-reduced with the model's all the same (DDP hooks every parameter's gradient).
Rank 0 prints ``step=<n> train_loss=<mean over ranks> val_loss=<y>``. At the end each rank prints
the pieces it read, ``rank=<r> read=<json [source, offset, end]>``, and whether its tables and model
equal rank 0's, ``rank=<r> tables_identical=<bool> model_identical=<bool> tables_changed=<bool>``.
``--checkpoint FILE`` saves, at each evaluation, the model, the tables, the optimizer (the same on every
rank) and every rank's pipeline state (gathered to rank 0, which writes the file); ``--resume FILE``
loads them, each rank its own data position, so a resumed run sees exactly the batches that followed.
On another number of ranks every rank passes all the saved states to ``load_state_dict(states,
reshard=True)``, and the epoch goes on with each document read once (windows are shuffled within a batch:
a state saved inside a larger shuffle group would be refused).

    torchrun --standalone --nproc_per_node 2 examples/ddp.py --steps 8 --checkpoint ckpt.pt
    torchrun --standalone --nproc_per_node 3 examples/ddp.py --steps 16 --resume ckpt.pt
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_gpt import TextPieces, batches, build, evaluate, loss_of, parse_args, restore, save  # noqa: E402


class Trainable(nn.Module):
    """The model and the embed stage's tables in one module, so DDP all-reduces the gradients of both."""

    def __init__(self, model: nn.Module, embedding: nn.Module):
        super().__init__()
        self.model, self.embedding = model, embedding

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(embeddings)  # the embeddings come from the pipeline, made with self.embedding


def same_on_all_ranks(module: nn.Module) -> bool:
    """Whether every parameter equals rank 0's, on every rank."""
    same, device = True, next(module.parameters()).device
    for p in module.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        same &= torch.equal(reference, p.detach())
    flag = torch.tensor(int(same), device=device)  # nccl reduces GPU tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def mean_over_ranks(value: float, device: torch.device) -> float:
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def save_all_ranks(path: str, step: int, model: nn.Module, pipe, optimizer, args) -> None:
    """Rank 0 writes the checkpoint, with every rank's pipeline state; the others wait for it."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, pipe.state_dict())
    if dist.get_rank() == 0:
        save(path, step, model, pipe, optimizer, args, data=states)
    dist.barrier()


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available() and args.device != "cpu":  # one GPU per rank
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    model, pipe, val = build(args)  # after init_process_group: the readers find their rank there
    embedding = pipe.embedding
    trainable = DistributedDataParallel(Trainable(model, embedding))  # broadcasts rank 0's weights
    initial = embedding.tok_emb.weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    step = restore(args.resume, model, pipe, optimizer, args, rank, dist.get_world_size()) if args.resume else 0
    data, losses = batches(pipe), []
    while step < args.steps:
        step += 1
        batch = next(data)
        loss = loss_of(trainable(batch["embeddings"]), batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # all-reduces the gradients of the model and of the tables
        optimizer.step()
        losses.append(loss.detach())  # no .item() here: it would make the host wait for the device every step
        if step == 1 or step % args.eval_every == 0 or step == args.steps:
            train_loss = mean_over_ranks(torch.stack(losses).mean().item(), loss.device)
            val_loss = evaluate(model, embedding, val, args.eval_batches)  # the same on every rank
            if rank == 0:
                print(f"step={step} train_loss={train_loss:.6f} val_loss={val_loss:.6f}", flush=True)
            losses = []
            if args.checkpoint:
                save_all_ranks(args.checkpoint, step, model, pipe, optimizer, args)
    reader = next(node for node in pipe.stages.values() if isinstance(node, TextPieces))
    read = sorted({tuple(unit) for unit in reader.read_log})
    tables, whole = same_on_all_ranks(embedding), same_on_all_ranks(model)
    changed = not torch.equal(initial, embedding.tok_emb.weight.detach())
    for r in range(dist.get_world_size()):  # one rank at a time, so the lines do not interleave
        if r == rank:
            print(f"rank={rank} read={json.dumps(read)}", flush=True)
            print(f"rank={rank} tables_identical={tables} model_identical={whole} tables_changed={changed}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
