"""Score-first legality of test-time training, checked on recorded positions (for every TTT stage).

A TTT stage is legal when each target it trains on was scored before that training step. A test
records what the stage does as a chronological list of events:

    ("score", positions)  targets whose scores one scoring call fixed
    ("train", positions)  targets the loss of one optimizer step depends on

Target i is token i+1 of the validation stream. On a `position_stream` every token id occurs
once, so a spy on the training loss reads the positions off the targets it is handed.
`assert_score_first` checks the events; `spy_ttt` records them for `eval_ttt`. A new TTT stage
adds its own spy (its scoring call, its loss, its step boundary) and reuses the rest.
"""
from __future__ import annotations

import torch


def position_stream(n_targets: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """n_targets + 1 distinct token ids in random order: a token's id identifies its position."""
    if n_targets + 1 > vocab:
        raise ValueError(f"{n_targets} targets need a vocabulary of at least {n_targets + 1} ids")
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: n_targets + 1]


def target_positions(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Stream positions of target tokens taken from a position_stream (target i = token i+1)."""
    where = torch.full((int(tokens.max()) + 1,), -1, dtype=torch.long)
    where[tokens] = torch.arange(tokens.numel())
    pos = where[targets.flatten().long()] - 1
    assert (pos >= 0).all(), "a target is not a token of the stream after its first"
    return pos


def assert_score_first(events: list[tuple[str, torch.Tensor]], n_targets: int) -> None:
    """Every trained target was scored by an earlier event; no target is scored twice."""
    scored = torch.zeros(n_targets, dtype=torch.bool)
    for k, (kind, pos) in enumerate(events):
        if kind == "score":
            twice = pos[scored[pos]].tolist() + [p for p, c in zip(*pos.unique(return_counts=True)) if c > 1]
            assert not twice, f"event {k}: targets scored twice: {twice[:10]}"
            scored[pos] = True
        else:
            early = pos[~scored[pos]].unique()
            assert early.numel() == 0, f"event {k}: training on targets not yet scored: {early[:10].tolist()}"


def train_steps(events: list[tuple[str, torch.Tensor]]) -> list[list[int]]:
    """The sorted trained positions of each training step, in order."""
    return [sorted(pos.tolist()) for kind, pos in events if kind == "train"]


def spy_ttt(monkeypatch, tg, tokens: torch.Tensor, loss_fn):
    """Record eval_ttt's events: returns (events, loss_spy); pass loss_spy as eval_ttt's loss_fn.

    Scoring: each score_windows call first runs on a scorer of ones into a private NLL buffer, so
    the targets it scores (its own mask, nothing re-derived here) are read off that buffer.
    Training: the loss spy collects target positions; the gradient reduction, called once per
    optimizer step on every rank, closes the step.
    """
    events: list[tuple[str, torch.Tensor]] = []
    pending: list[torch.Tensor] = []
    score_windows, reduce_grads = tg.score_windows, tg.reduce_grads
    total = tokens.numel() - 1

    def score_spy(scorer, toks, starts, ctx, seq_len, per_batch, luts, sums, nll_out, tilt=None):
        marks = torch.zeros(total)
        score_windows(lambda x, y: torch.ones(y.shape), toks, starts, ctx, seq_len, per_batch, luts,
                      torch.zeros_like(sums), marks)
        events.append(("score", torch.repeat_interleave(torch.arange(total), marks.round().long())))
        score_windows(scorer, toks, starts, ctx, seq_len, per_batch, luts, sums, nll_out, tilt)

    def loss_spy(x, y):
        pending.append(target_positions(tokens, y))
        return loss_fn(x, y)

    def step_spy(params, world_size, average):
        events.append(("train", torch.cat(pending) if pending else torch.zeros(0, dtype=torch.long)))
        pending.clear()
        return reduce_grads(params, world_size, average)

    monkeypatch.setattr(tg, "score_windows", score_spy)
    monkeypatch.setattr(tg, "reduce_grads", step_spy)
    return events, loss_spy
