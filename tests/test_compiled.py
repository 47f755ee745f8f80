"""The compiled path as a GPU runs it: torch.compile(fullgraph=True, dynamic=False) by Inductor on CPU
under the CUDA contract (bf16 autocast, FA3 varlen stand-ins, cu_seqlens built outside the graph).

fullgraph=True turns a graph break into an error; the graphs Inductor compiles are counted, so a guard
that misses (a new compile where an existing graph should have served) fails on the exact count."""
import copy
import dataclasses
import functools
import shutil

import pytest
import torch

import cuda_contract
import train_gpt as tg
from conftest import TINY
from test_frontier import perturbed_model

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
BOS = tg.BOS_ID
# Every feature of TINY (recurrence, U-net skips with gates, two lanes, XSA, partial RoPE, GQA, SmearGate,
# attention gate, document mask, fused CE) at the smallest size: Inductor's C++ compiles dominate the time.
SMALL = dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, loop_start=1, loop_end=1,
             parallel_residual_start=1, xsa_last_n=2, val_batch_tokens=64, compile=True)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor's CPU backend needs a C++ compiler (g++)")


def small(**over) -> tg.Hyperparameters:
    h = tg.Hyperparameters(**{**TINY, **SMALL, **over})
    assert h.doc_mask and h.smear_gate and h.attn_gate == "sparse" and h.fused_ce and h.looping_enabled
    return h


class InductorCounter:
    """A torch.compile backend: counts the graphs Dynamo hands over, compiles each with Inductor."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


@pytest.fixture
def compiled_contract(monkeypatch):
    """train_gpt on its CUDA paths with every torch.compile going to a counting Inductor backend;
    Inductor's caches off (each graph really compiled), C++ kernels scalar (they compile ~2x faster and
    the CPU kernels are not what runs on the GPU), Dynamo state reset before and after."""
    import torch._functorch.config as fc
    import torch._inductor.config as ic

    cuda_contract.install(tg, monkeypatch=monkeypatch)
    counter = InductorCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    with ic.patch(fx_graph_cache=False, compile_threads=1, **{"cpp.simdlen": 0}), fc.patch(enable_autograd_cache=False):
        yield counter
    torch._dynamo.reset()


def batch(n_bos: int, gen, vocab: int, shape=(2, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) with n_bos BOS planted off the row starts: 2 + n_bos segment starts in cu_seqlens."""
    B, T = shape
    x = torch.randint(BOS + 1, vocab, shape, generator=gen)
    cols = torch.arange(B * T).view(B, T)[:, 1:].flatten()
    x.view(-1)[cols[torch.randperm(cols.numel(), generator=gen)[:n_bos]]] = BOS
    return x, torch.randint(BOS + 1, vocab, shape, generator=gen)


def bucket(x: torch.Tensor) -> int:
    """CU_BUCKET-sized blocks of x's FA3 boundary list: the segment starts (row starts and BOS), then the end."""
    starts = ((x == BOS) | (torch.arange(x.size(1)) == 0)).sum().item()
    return -(-(starts + 1) // tg.CU_BUCKET)


def test_compiled_training_step_one_graph_per_loop_mode(compiled_contract, monkeypatch):
    """Trainer.train_step (8 micro-steps, forward + backward, Muon + AdamW) in both loop modes: one
    Inductor graph per loop mode, none per batch (1 to 61 BOS, all in cu_seqlens bucket 1), none on
    returning to a mode; losses and gradients as the eager CUDA path gives them."""
    h = small()
    gen = torch.Generator().manual_seed(0)
    few = [0, 1, 5, 17, 30, 45, 60, 61]  # 2..63 segment starts: one CU_BUCKET
    steps = [(mode, [batch(n, gen, h.vocab_size) for n in ns], want)
             for mode, ns, want in [(False, few, 1), (True, few, 2), (False, few[::-1], 2)]]
    assert {bucket(x) for _, bs, _ in steps for x, _ in bs} == {1}
    monkeypatch.setattr(tg, "TrainLoader", lambda *a: None)  # batches come from the plan
    trainers = []
    for compiled in (True, False):
        model = perturbed_model(h)
        tr = tg.Trainer(dataclasses.replace(h, compile=compiled), CPU, lambda s: None, model, [])
        assert (tr.compiled is not model) == compiled
        trainers.append(tr)
    losses = {True: [], False: []}
    for mode, batches, want in steps:
        for tr, compiled in zip(trainers, (True, False)):
            tg.set_looping(tr.base, mode)
            feed = iter(copy.deepcopy(batches))  # with the layout the loader thread builds
            tr.next_micro = lambda: (lambda x, y: (x, y, tg.DocLayout(None, tg.host_cu_seqlens(x))))(*next(feed))
            losses[compiled].append(tr.train_step(0, 1.0))
        assert compiled_contract.graphs == want, torch._dynamo.utils.guard_failures
    torch.testing.assert_close(torch.stack(losses[True]), torch.stack(losses[False]), rtol=0, atol=2e-3)
    x, y = batch(9, gen, h.vocab_size)  # gradients of one micro-step at equal weights: compiled, eager, fp32
    trainers[1].base.load_state_dict(trainers[0].base.state_dict())
    for tr in trainers:
        with tg.autocast_ctx(CPU.device):
            tr.compiled(x, y, tr.base.doc_layout(x)).backward()
    assert compiled_contract.graphs == 2
    ref = copy.deepcopy(trainers[1].base)
    ref.zero_grad()
    monkeypatch.setattr(tg, "CUDA_CONTRACT", False)  # fp32, SDPA with the document mask
    ref(x, y).backward()
    for (name, a), b, r in zip(trainers[0].base.named_parameters(), trainers[1].base.parameters(), ref.parameters()):
        e_c, e_e = ((a.grad - r.grad).norm() / r.grad.norm()).item(), ((b.grad - r.grad).norm() / r.grad.norm()).item()
        assert e_c <= 2 * e_e + 5e-3, (name, e_c, e_e)  # bf16 noise, as large as eager bf16's (0.5-4%)


def doc_stream(gen, vocab: int) -> torch.Tensor:
    """A validation-like stream: documents of 1 to 150 tokens, and a run of 1-2 token documents dense
    enough that a batch of two windows reaches cu_seqlens bucket 2."""
    lengths = [150, 7, 60, 1, 33, 90, 12] + [1, 2] * 45 + [40, 75, 5, 64]
    parts = [torch.cat([torch.tensor([BOS]), torch.randint(BOS + 1, vocab, (n - 1,), generator=gen)]) for n in lengths]
    return torch.cat(parts + [torch.tensor([BOS])])


def test_compiled_eval_scorer_compiles_only_in_warmup(compiled_contract):
    """eval_callables + eval_warmup compile the no-grad scorer once per reachable cu_seqlens bucket (two
    windows a batch: buckets 1 and 2); the plain, sliding and document evals then compile nothing and
    score as the eager CUDA path does. Outside autocast the graph's guard misses and FA3 refuses fp32."""
    h = small(val_batch_tokens=128)
    gen = torch.Generator().manual_seed(1)
    model = perturbed_model(h)
    tokens = doc_stream(gen, h.vocab_size)
    V = h.vocab_size
    luts = (torch.randint(1, 5, (V,), generator=gen), torch.rand(V, generator=gen) < 0.3, torch.rand(V, generator=gen) < 0.1)
    scorer, loss_fn = tg.eval_callables(h, model, CPU)
    assert compiled_contract.graphs == 0
    tg.eval_warmup(h, model, scorer, loss_fn, CPU, tokens)
    assert compiled_contract.graphs == 2, torch._dynamo.utils.guard_failures
    stages = [lambda f: tg.eval_windows(h, f, CPU, tokens, luts, h.eval_seq_len, True),
              lambda f: tg.eval_windows(h, f, CPU, tokens, luts, h.eval_stride, True),
              lambda f: tg.eval_doc_windows(h, f, CPU, tokens, luts, h.eval_stride, True)]
    seen = set()
    spy = lambda x, y: seen.add(bucket(x)) or scorer(x, y)  # noqa: E731
    for stage in stages:
        (res, nll), (ref, ref_nll) = stage(spy), stage(model.token_nll)
        assert compiled_contract.graphs == 2, torch._dynamo.utils.guard_failures
        assert res.tokens == ref.tokens and res.bytes == ref.bytes
        torch.testing.assert_close(nll, ref_nll, rtol=0, atol=2e-2)
        assert abs(res.val_loss - ref.val_loss) < 2e-3
    assert seen == {1, 2}  # real batches in both compiled buckets
    x = tokens[:128].view(2, 64)
    with torch.no_grad(), pytest.raises(Exception, match="FlashAttention only supports fp16, bf16"):
        scorer(x, x)  # no autocast: fp32 q/k/v


@pytest.mark.parametrize("val_batch_tokens", [512, 128])  # 128: 2 windows, fewer than a TTT step's 8 sequences
def test_pipeline_compiles_only_in_warmups(tmp_path, monkeypatch, val_batch_tokens):
    """train_and_eval under the contract with COMPILE=1 (Dynamo with its guards, graphs run eagerly):
    the training warmup compiles at most one graph per (loop mode, reachable cu_seqlens bucket), and no
    graph is compiled in the timed training loop or in a timed eval stage (a guard miss would), the
    LoRA stage's included."""
    from conftest import SP1024, short_docs_dataset

    data = short_docs_dataset(tmp_path / "data", 60, 20, 600, shard_tokens=300_000)
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    events = []

    def backend(gm, example_inputs):
        events.append(None)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    h = small(data_path=str(data), tokenizer_path=str(SP1024), log_dir=str(tmp_path), run_id="c", warmup_steps=1,
              iterations=6, val_loss_every=3, enable_looping_at=0.5, ttt_enabled=True, ttt_epochs=1,
              val_batch_tokens=val_batch_tokens, lora_ttt_enabled=val_batch_tokens == 512, lora_rank=8,
              lora_chunk_tokens=16, lora_batch_docs=4, phased_prefix_docs=3, phased_num_phases=1)
    torch._dynamo.reset()
    try:
        assert tg.train_and_eval(h, CPU, lambda msg, **kw: events.append(msg)) == 0
    finally:
        torch._dynamo.reset()
    logs = [e for e in events if e is not None]
    at = lambda prefix: next(i for i, e in enumerate(events) if e is not None and e.startswith(prefix))  # noqa: E731
    between = lambda a, b: events[at(a):at(b)].count(None)  # noqa: E731
    assert any("looping:on" in m for m in logs) and any(m.startswith("final_ttt") for m in logs)
    assert h.lora_ttt_enabled == any(m.startswith("final_lora_ttt") for m in logs)  # packed LoRA steps, a phase too
    assert 2 <= between("model_params", "warmup_steps") <= 2 * 2  # loop modes x buckets of a [2, 64] batch
    assert between("train_clock", "train_steps") == 0
    assert between("artifact counted", "eval_warmup") >= 1
    assert events[at("eval_warmup"):].count(None) == 0


def test_seq_schedule_compiles_every_shape_in_the_warmup_only(dataset, monkeypatch):
    """TRAIN_SEQ_SCHEDULE under the contract with COMPILE=1 (Dynamo with its guards, graphs run eagerly):
    the warmup compiles one graph per (loop mode, length, cu_seqlens bucket) it plants, at least one per
    reachable (loop mode, length) pair, and the timed loop, which switches length twice and turns the
    recurrence on, compiles none. ASYM_SOFTCAP's unfused head traces as one graph too (fullgraph)."""
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(next(tuple(t.shape) for t in example_inputs if t.dtype == torch.long and t.ndim == 2))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    h = small(iterations=8, warmup_steps=1, enable_looping_at=0.5, train_seq_schedule="16@0.25,32@0.5,64@1",
              asym_softcap=True)
    shapes = tg.train_shapes(h)
    assert shapes == [(False, 16), (False, 32), (True, 32), (True, 64)]
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        logs = []
        tr = tg.Trainer(h, CPU, logs.append, tg.GPT(h), tg.shard_paths(str(dataset), "train"))
        tr.warmup()
        warm = list(graphs)
        tr.run(lambda m: None)
    finally:
        torch._dynamo.reset()
    assert graphs == warm, torch._dynamo.utils.guard_failures  # nothing compiled inside the clock
    assert sum("seq_len_switch" in m for m in logs) == 2 and any("looping:on" in m for m in logs)
    assert sum(m.startswith("varlen_warmup") for m in logs) == 3  # the bucket range of each distinct length
    # one graph per (loop mode, length): this data's batches all sit in cu_seqlens bucket 1 (as the
    # warmup's planted copies); every graph holds the same 128 tokens of a micro-step
    assert warm == [(128 // n, n) for _, n in shapes]
