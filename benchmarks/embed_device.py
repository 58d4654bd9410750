"""How long the GPU waits for data in each training step, with the embed stage's prefetch on and off.

    python benchmarks/embed_device.py                      # needs CUDA; names the GPU in its table
    python benchmarks/embed_device.py --device cpu --steps 5 --models tiny   # checks the script on a CPU

The stream is the whole pipeline, read -> bpe_encode -> sliding_window -> batch -> embed (on the
device), into a step of ``examples/train_gpt.py``'s GPT (forward, backward, AdamW; bf16 autocast on
a GPU). Per step, CUDA events mark when the GPU finishes step k-1 and when step k's embeddings are
ready: the gap, on the GPU's own clock, is the time the GPU spends on (or idle waiting for) step k's
data: the host fetching the batch, the host-to-device copy and the embedding lookup. The table
gives its median and 90th percentile, the step's GPU time, and the host's time inside ``next()``.
It also times the stream alone (no model): batches and tokens per second out of the embed stage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from pipeline import Pipeline  # noqa: E402
from stages import Batch, BpeEncode, Embed, ReadText, SlidingWindow  # noqa: E402
from train_gpt import GPT, loss_of  # noqa: E402

MODELS = {"tiny": (64, 2, 2), "gpt2-small": (768, 12, 12)}  # emb_dim, layers, heads


def make_pipeline(args: argparse.Namespace, d_model: int, prefetch: bool) -> Pipeline:
    node = BpeEncode(ReadText([args.data]))
    node = SlidingWindow(node, max_length=args.context, stride=args.context)
    node = Batch(node, batch_size=args.batch, shuffle=True, seed=0)
    node = Embed(node, vocab_size=50257, d_model=d_model, context_length=args.context, device=args.device, seed=0,
                 prefetch=prefetch)
    return Pipeline(node, num_workers=args.num_workers)


def forever(pipe: Pipeline):
    while True:
        yield from pipe


class Clock:
    """Timestamps on the GPU's clock (CUDA events) or, on a CPU, the host's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)


def run_steps(args: argparse.Namespace, model_name: str, prefetch: bool) -> dict[str, float]:
    emb_dim, layers, heads = MODELS[model_name]
    pipe = make_pipeline(args, emb_dim, prefetch)
    device = pipe.embedding.tok_emb.weight.device
    torch.manual_seed(0)
    model = GPT(emb_dim, layers, heads, args.context).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *pipe.embedding.parameters()], lr=1e-4, fused=True)
    clock, data, marks = Clock(device), forever(pipe), []
    done = clock.stamp()
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        batch = next(data)
        host = time.perf_counter() - started
        ready = clock.stamp()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(model(batch["embeddings"]), batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # no .item(): the host runs ahead of the GPU as in a real loop
        optimizer.step()
        end = clock.stamp()
        marks.append((done, ready, end, host))
        done = end
    if clock.cuda:
        torch.cuda.synchronize()
    marks = marks[args.warmup :]
    wait = sorted(clock.ms(d, r) for d, r, _, _ in marks)
    return {
        "wait_median": statistics.median(wait),
        "wait_p90": wait[int(0.9 * (len(wait) - 1))],
        "step": statistics.median(clock.ms(r, e) for _, r, e, _ in marks),
        "host_next": statistics.median(1000 * h for *_, h in marks),
    }


def stream_alone(args: argparse.Namespace) -> tuple[float, float]:
    """Batches and tokens per second out of the embed stage, nothing else running."""
    data = forever(make_pipeline(args, 768, prefetch=True))
    for _ in range(args.warmup):
        next(data)
    if args.device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        batch = next(data)
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return args.steps / seconds, args.steps * batch["inputs"].numel() / seconds / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (to check the script)")
    p.add_argument("--models", default="tiny,gpt2-small", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=0, help="worker processes for read/encode/window")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("embed_device.py: CUDA is not available on this machine: this benchmark measures how long a GPU waits "
                 "for data. Run it where a GPU is, or with --device cpu only to check the script.")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (host clock; no overlap to measure)"
    print(f"device: {name}; torch {torch.__version__}; data {args.data}; batch {args.batch} x {args.context} tokens; "
          f"{args.steps} steps after {args.warmup} warm-up; num_workers {args.num_workers}")
    batches_s, tokens_s = stream_alone(args)
    print(f"stream alone (d_model 768): {batches_s:.0f} batches/s, {tokens_s:.2f} M tokens/s\n")
    print("| model | prefetch | GPU waits for data, ms/step (median / p90) | step, ms (GPU) | host in next(), ms |")
    print("| --- | --- | --- | --- | --- |")
    for model_name in args.models.split(","):
        for prefetch in (False, True):
            r = run_steps(args, model_name, prefetch)
            on = "on" if prefetch else "off"
            print(
                f"| {model_name} | {on} | {r['wait_median']:.3f} / {r['wait_p90']:.3f} | {r['step']:.2f} | "
                f"{r['host_next']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
