"""The embed stage: gradients to the tables, the position variants, weights, dtypes, modes, prefetch and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torchdata.nodes import IterableWrapper, Loader

from pipeline import ConfigError, Pipeline, StageError
from stages import Batch, BpeEncode, Embed, InputEmbedding, ReadText, SlidingWindow
from stages.embed import sinusoidal_table
from tests.resume import check_resume

VOCAB, D, T = 50, 6, 5


def batches(n: int, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    """``n`` batches of 3 windows of ``T`` ids below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda: torch.randint(0, vocab, (3, T), generator=g)  # noqa: E731
    return [{"inputs": ids(), "targets": ids()} for _ in range(n)]


def embed(items: list[dict], **fields) -> Embed:
    return Embed(
        IterableWrapper(items), **{"vocab_size": VOCAB, "d_model": D, "context_length": T, "seed": 1, **fields}
    )


def paper(context_length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), one entry at a time."""
    table = torch.zeros(context_length, d_model, dtype=torch.float64)
    for pos in range(context_length):
        for dim in range(d_model):
            angle = pos / 10000 ** ((dim - dim % 2) / d_model)
            table[pos, dim] = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
    return table


# --- tables and gradients ---------------------------------------------------------------------------


def test_gradients_reach_both_tables_and_sgd_moves_only_the_used_rows():
    stage = embed(
        [{"inputs": torch.tensor([[3, 7, 7, 11], [3, 20, 0, 1]]), "targets": torch.zeros(2, 4, dtype=torch.int64)}]
    )
    module = stage.module
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    batch = next(stage)
    (batch["embeddings"] * torch.randn(batch["embeddings"].shape)).sum().backward()
    assert module.tok_emb.weight.grad.abs().sum() > 0 and module.pos_emb.weight.grad.abs().sum() > 0
    optimizer.step()
    moved = (module.tok_emb.weight != before["tok_emb.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert moved == [0, 1, 3, 7, 11, 20]  # the ids of the batch, and no other row
    moved = (module.pos_emb.weight != before["pos_emb.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert moved == [0, 1, 2, 3]  # the 4 positions used; row 4 of the 5 untouched


@pytest.mark.parametrize("context_length,d_model", [(1, 2), (7, 6), (12, 7), (64, 32)])
def test_sinusoidal_table_is_the_papers_formula(context_length, d_model):
    table = sinusoidal_table(context_length, d_model)
    assert table.dtype == torch.float32 and table.shape == (context_length, d_model)
    torch.testing.assert_close(table.double(), paper(context_length, d_model), rtol=0, atol=1e-6)


def test_sinusoidal_positions_are_a_fixed_table():
    stage = embed(batches(1), positional="sinusoidal")
    module = stage.module
    assert not hasattr(module, "pos_emb") and [name for name, _ in module.named_parameters()] == ["tok_emb.weight"]
    assert list(module.state_dict()) == ["tok_emb.weight"]  # the table is the formula's, not a weight to save
    batch = next(stage)
    torch.testing.assert_close(
        batch["embeddings"], module.tok_emb(batch["inputs"]) + paper(T, D).float(), rtol=0, atol=1e-6
    )
    batch["embeddings"].sum().backward()
    assert module.tok_emb.weight.grad.abs().sum() > 0


def test_none_has_no_position_table():
    stage = embed(batches(1), positional="none")
    module = stage.module
    assert not hasattr(module, "pos_emb") and not hasattr(module, "pos_table")
    assert [name for name, _ in module.named_parameters()] == ["tok_emb.weight"]
    batch = next(stage)
    assert torch.equal(batch["embeddings"], module.tok_emb(batch["inputs"]))


# --- weights ------------------------------------------------------------------------------------------


def test_weights_load_the_tables(tmp_path):
    trained = InputEmbedding(VOCAB, D, T, "learned", seed=7)
    path = tmp_path / "embedding.pt"
    torch.save(trained.state_dict(), path)
    stage = embed(batches(1), weights=str(path))  # seed 1 drew other tables: the file's win
    assert torch.equal(stage.module.tok_emb.weight, trained.tok_emb.weight)
    assert torch.equal(stage.module.pos_emb.weight, trained.pos_emb.weight)
    # a whole model's state dict, named as the book's GPTModel: the other keys are ignored
    model = {**trained.state_dict(), "out_head.weight": torch.zeros(VOCAB, D), "final_norm.scale": torch.ones(D)}
    torch.save(model, path)
    for positional in ("learned", "sinusoidal", "none"):
        stage = embed(batches(1), weights=str(path), positional=positional, dtype="bfloat16")
        assert torch.equal(stage.module.tok_emb.weight, trained.tok_emb.weight.bfloat16())


def test_weights_errors_name_the_field(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"tok_emb.weight": torch.zeros(VOCAB, D)}, path)
    with pytest.raises(ValueError, match=r"weights .*w\.pt.*pos_emb\.weight"):
        embed([], weights=str(path))  # learned positions need pos_emb.weight
    torch.save({"tok_emb.weight": torch.zeros(VOCAB + 1, D), "pos_emb.weight": torch.zeros(T, D)}, path)
    with pytest.raises(ValueError, match=r"weights .*`tok_emb\.weight` is \(51, 6\), the stage's table is \(50, 6\)"):
        embed([], weights=str(path))
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="weights .*expected a state dict, got list"):
        embed([], weights=str(path))
    path.write_text("not a torch file")
    with pytest.raises(ValueError, match="weights .*not a file saved by torch.save"):
        embed([], weights=str(path))
    with pytest.raises(FileNotFoundError, match="weights: no such file"):
        embed([], weights=str(tmp_path / "missing.pt"))


def test_weights_and_prefetch_in_a_config(tmp_path, verdict_path):
    path = tmp_path / "w.pt"
    trained = InputEmbedding(50257, 8, 4, "learned", seed=3)
    torch.save(trained.state_dict(), path)
    stages = {
        "read": {"type": "read_text", "paths": [str(verdict_path)]},
        "encode": {"type": "bpe_encode", "input": "read"},
        "window": {"type": "sliding_window", "input": "encode", "max_length": 4, "stride": 4},
        "batch": {"type": "batch", "input": "window", "batch_size": 8},
        "embed": {
            "type": "embed",
            "input": "batch",
            "vocab_size": 50257,
            "d_model": 8,
            "context_length": 4,
            "weights": str(path),
            "prefetch": True,
        },
    }
    pipe = Pipeline.from_config({"stages": stages})
    assert torch.equal(pipe.embedding.tok_emb.weight, trained.tok_emb.weight)
    assert next(iter(pipe))["inputs"][0].tolist() == [40, 367, 2885, 1464]
    stages["embed"]["weights"] = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="weights") as error:
        Pipeline.from_config({"stages": stages})
    assert error.value.stage == "embed"
    stages["embed"].update(weights=None, prefetch="yes")
    with pytest.raises(ConfigError, match="prefetch"):
        Pipeline.from_config({"stages": stages})


# --- dtypes, autocast, modes, compile ---------------------------------------------------------------


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "none"])
def test_bfloat16_tables_give_bfloat16_embeddings(positional):
    stage = embed(batches(1), positional=positional, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in stage.module.parameters())
    batch = next(stage)
    assert batch["embeddings"].dtype == torch.bfloat16
    reference = InputEmbedding(VOCAB, D, T, positional, seed=1)(batch["inputs"])  # float32, then rounded
    torch.testing.assert_close(batch["embeddings"].float(), reference, rtol=2e-2, atol=2e-2)
    batch["embeddings"].float().sum().backward()
    assert stage.module.tok_emb.weight.grad.dtype == torch.bfloat16 and stage.module.tok_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_autocast_keeps_the_tables_dtype(positional):
    ids = batches(1)[0]["inputs"]
    for dtype in (torch.float32, torch.bfloat16):
        module = InputEmbedding(VOCAB, D, T, positional, seed=1).to(dtype)
        eager = module(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = module(ids)
            assert torch.nn.Linear(D, 2)(cast).dtype == torch.bfloat16  # autocast is on downstream
        assert cast.dtype == dtype and torch.equal(cast, eager)  # the position add neither up- nor down-casts


def test_train_and_eval_modes_and_no_grad():
    stage = embed(batches(3))
    train = next(stage)["embeddings"]
    assert train.requires_grad and train.grad_fn is not None
    stage.module.eval()
    with torch.no_grad():
        evaluated = next(stage)["embeddings"]
    assert not evaluated.requires_grad and evaluated.grad_fn is None
    again = embed(batches(3))
    next(again)
    torch.testing.assert_close(
        evaluated, next(again)["embeddings"].detach(), rtol=0, atol=0
    )  # the modes compute the same


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_compiled_module_equals_eager(positional):
    """torch.compile on the CPU (inductor, a C++ compiler): about 20 s the first time in a process, 1 s after."""
    eager = InputEmbedding(VOCAB, D, T, positional, seed=1)
    compiled = torch.compile(InputEmbedding(VOCAB, D, T, positional, seed=1))
    ids = batches(1)[0]["inputs"]
    out_eager, out_compiled = eager(ids), compiled(ids)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-6, atol=1e-6)
    (out_eager**2).sum().backward()
    (out_compiled**2).sum().backward()
    torch.testing.assert_close(compiled.tok_emb.weight.grad, eager.tok_emb.weight.grad, rtol=1e-6, atol=1e-6)


# --- prefetch: one batch ahead, the state exact ---------------------------------------------------


def verdict_node(verdict_path, prefetch: bool | None, device: str = "cpu") -> Embed:
    node = SlidingWindow(
        BpeEncode(ReadText([str(verdict_path)], chunk_bytes=4096)), max_length=4, stride=4, block_windows=50
    )
    node = Batch(node, batch_size=8, shuffle=True, seed=5, shuffle_windows=64)
    return Embed(node, vocab_size=50257, d_model=8, context_length=4, seed=1, prefetch=prefetch, device=device)


def test_prefetch_reads_one_batch_ahead_and_its_state_is_after_the_batch_returned(verdict_path):
    ahead, plain = verdict_node(verdict_path, prefetch=True), verdict_node(verdict_path, prefetch=False)
    assert not plain.prefetch and ahead.prefetch
    for k in range(1, 6):
        a, b = next(ahead), next(plain)
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["embeddings"], b["embeddings"])
        assert ahead.source.stats["batches"] == k + 1 and plain.source.stats["batches"] == k  # one batch ahead
        assert ahead.state_dict() == plain.state_dict()  # the position after batch k, not after k + 1


def test_prefetch_resumes_exactly(verdict_path):
    data = lambda b: {k: b[k] for k in ("inputs", "targets")}  # noqa: E731
    reference = check_resume(lambda: verdict_node(verdict_path, prefetch=True), project=data)
    plain = [data(b) for b in Loader(verdict_node(verdict_path, prefetch=False))]
    assert len(reference) == len(plain) == 160
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(reference, plain))


def test_an_error_ahead_is_raised_at_its_batch():
    items = batches(4)
    items[2]["inputs"][1, 1] = VOCAB  # one past the table
    for prefetch in (False, True):
        stage = embed(items, prefetch=prefetch)
        assert [torch.equal(next(stage)["inputs"], items[i]["inputs"]) for i in range(2)] == [True, True]
        with pytest.raises(StageError, match=f"token id {VOCAB} is outside the token table"):
            next(stage)


def test_the_end_comes_after_the_last_batch():
    stage = embed(batches(2), prefetch=True)
    assert len([next(stage), next(stage)]) == 2
    with pytest.raises(StopIteration):
        next(stage)
    with pytest.raises(StopIteration):
        next(stage)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        embed([], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_come_prefetched_and_exact(verdict_path):
    gpu, cpu = verdict_node(verdict_path, prefetch=None, device="cuda"), verdict_node(verdict_path, prefetch=False)
    assert gpu.prefetch  # the default on a GPU
    for k in range(1, 6):
        a, b = next(gpu), next(cpu)
        assert a["inputs"].is_cuda and a["embeddings"].is_cuda
        assert torch.equal(a["inputs"].cpu(), b["inputs"]) and torch.equal(a["targets"].cpu(), b["targets"])
        torch.testing.assert_close(a["embeddings"].cpu(), b["embeddings"])
        assert gpu.source.stats["batches"] == k + 1 and gpu.state_dict() == cpu.state_dict()
    data = lambda b: {k: b[k].cpu() for k in ("inputs", "targets")}  # noqa: E731
    check_resume(lambda: verdict_node(verdict_path, prefetch=None, device="cuda"), project=data)


# --- the embed stage's own check, on both paths --------------------------------------------------


def python_built(max_length: int, context_length: int, vocab_size: int = 50257) -> Embed:
    windows = SlidingWindow(BpeEncode(IterableWrapper([{"text": "A few words."}])), max_length=max_length, stride=1)
    return Embed(Batch(windows, 2), vocab_size=vocab_size, d_model=8, context_length=context_length, device="cpu")


def as_config(max_length: int, context_length: int, vocab_size: int = 50257) -> dict:
    """The same graph as ``python_built``, its stages named as the Python-built ones are (by type)."""
    return {"stages": {
        "read_text": {"type": "read_text", "paths": "examples/verdict.yaml"},  # never read: refused before
        "bpe_encode": {"type": "bpe_encode", "input": "read_text"},
        "sliding_window": {"type": "sliding_window", "input": "bpe_encode", "max_length": max_length, "stride": 1},
        "batch": {"type": "batch", "input": "sliding_window", "batch_size": 2},
        "embed": {"type": "embed", "input": "batch", "vocab_size": vocab_size, "d_model": 8,
                  "context_length": context_length, "device": "cpu"},
    }}


@pytest.mark.parametrize("fields,field", [((8, 4), "context_length"), ((4, 4, 1000), "vocab_size")])
def test_a_python_built_pipeline_is_refused_at_construction_as_its_config_is(in_root, fields, field):
    with pytest.raises(ConfigError) as built:
        Pipeline(python_built(*fields))
    with pytest.raises(ConfigError) as configured:
        Pipeline.from_config(as_config(*fields))
    assert (built.value.stage, built.value.field) == ("embed", field)
    assert (configured.value.stage, configured.value.field) == ("embed", field)
    assert str(built.value) == str(configured.value)
    assert "sliding_window" in str(built.value) or "bpe_encode" in str(built.value)


def test_a_python_built_pipeline_that_fits_builds():
    assert Pipeline(python_built(4, 4)).embedding is not None


@pytest.mark.parametrize("positional", ["learned", "none"])
def test_a_seed_draws_only_from_its_own_generator(positional):
    """Issue 14, item 12: the tables are the book's (``torch.manual_seed(123)``, then ``nn.Embedding`` for tokens and
    positions), and building them with ``seed`` leaves torch's global generator where it was."""
    torch.manual_seed(123)
    book_tok = torch.nn.Embedding(VOCAB, D)
    book_pos = torch.nn.Embedding(T, D)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    module = InputEmbedding(VOCAB, D, T, positional, seed=123)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(module.tok_emb.weight, book_tok.weight)
    if positional == "learned":
        assert torch.equal(module.pos_emb.weight, book_pos.weight)
    stage = embed(batches(1), seed=123, positional=positional)
    next(iter(Loader(stage)))
    assert torch.equal(torch.get_rng_state(), before)
