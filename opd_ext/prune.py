"""Prune-OPD: per-token drift tracking, reward down-weighting and in-batch early stopping (docs/spec.md §1).

While the student generates, each token's student/teacher top-k overlap says whether the teacher
still agrees with where the student is going. Once the prefix has drifted, the teacher's reward is
no longer locally useful: :class:`DriftMonitor` lowers the sequence's weight monotonically and
stops the sequence, so the generation loop can drop it from the batch. :class:`DynamicWindow`
adapts the length budget between training steps.

Typical decode loop::

    monitor = DriftMonitor(batch_size, PruneConfig(), device="cuda")
    active = torch.arange(batch_size, device="cuda")
    while active.numel():
        ...  # student and teacher logits for the active rows only: [A, V]
        stop = monitor.step(student_logits, teacher_logits, tokens, rows=active)
        active = active[~stop]           # and drop the same rows from both models' KV caches
    loss = opd_ext.vopd_loss(..., weights=monitor.multipliers, mask=monitor.mask)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch

from opd_ext import ops
from opd_ext._validation import (
    check_device,
    check_k,
    check_kernels_for,
    check_logit_pair,
    check_temperature,
    token_range_error,
)
from opd_ext.distributed import vocab_parallel_token_stats, vocab_parallel_topk_overlap

__all__ = ["PruneConfig", "DriftMonitor", "DynamicWindow", "StopReason", "DriftScan", "drift_scan"]


class StopReason:
    """Codes of :attr:`DriftMonitor.stop_reasons` (int8): ``opd::DriftStopReason`` of
    ``csrc/include/opd/drift.h``, which the kernels write (a test ties the two)."""

    RUNNING = 0
    WEIGHT_EXHAUSTED = 1  # weight fell to min_weight
    PATIENCE = 2  # `patience` consecutive drift events
    BUDGET = 3  # length reached the budget (window length L)
    FINISHED = 4  # stopped by the caller (EOS, max_new_tokens): finish()
    REPETITION = 5  # the rollout repeats itself (PruneConfig.loop_window); set in Python, never by a kernel

    #: The reasons a drift-free run would not have had: the rollouts Prune-OPD cut short.
    PRUNED = (WEIGHT_EXHAUSTED, PATIENCE, BUDGET, REPETITION)

    NAMES = {
        RUNNING: "running",
        WEIGHT_EXHAUSTED: "weight_exhausted",
        PATIENCE: "patience",
        BUDGET: "budget",
        FINISHED: "finished",
        REPETITION: "repetition",
    }


# The budget of a sequence without a length cap (the budget is an int32 in the kernels).
NO_BUDGET = 2**31 - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Prune-OPD settings. Defaults follow the authors' released code (docs/spec.md §1) unless noted.

    Drift detection, per generated token with top-k overlap ``o``:

    * ``k`` (16): top-k size of the overlap (student top-k vs teacher top-k).
    * ``ema_beta`` (0.0): ``ema <- ema_beta * ema + (1 - ema_beta) * o``; 0 uses the raw overlap, as
      the paper. The ema starts at a sequence's first overlap.
    * ``threshold`` (0.7): the token is a drift event when ``ema < threshold`` ...
    * ``warmup`` (0): ... and at least ``warmup`` tokens of the sequence precede it.

    Weighting (weights never increase):

    * ``w_drop`` (0.01): ``weight = clamp(1 - w_drop * drift_events, 0, 1)``.
    * ``decay`` (None): if set, the exponential schedule ``weight *= decay`` per drift event
      replaces the linear one (it never reaches 0: pair it with ``min_weight``, e.g. 0.05).
    * ``w_base`` (0.5): the token's reward multiplier is ``w_base + weight`` (1.5 down to 0.5 with
      the defaults; ``w_base=0`` gives pure down-weighting).

    Stopping (our extension; the authors only cap lengths between steps):

    * ``min_weight`` (0.0): stop the sequence once ``weight <= min_weight``; None never stops on
      the weight (tokens keep their down-weighted multipliers).
    * ``patience`` (None): also stop after this many consecutive drift events.

    Degeneration (ours). On real model pairs the teacher agrees with a student that repeats itself
    (inside a loop the next token is obvious to both), so neither the overlap nor the OPD reward
    sees a loop, and a looping rollout runs to the length cap teaching nothing:

    * ``loop_window`` (None = off): stop a rollout with ``StopReason.REPETITION`` once, for some
      period ``p <= loop_max_period``, at least ``loop_match`` of its last ``loop_window`` tokens
      equal the token ``p`` before them. Needs the sampled tokens (:meth:`DriftMonitor.step` /
      :meth:`~DriftMonitor.observe` / :func:`drift_scan` with ``tokens=``).
    * ``loop_match`` (0.5): that fraction; 1 asks for an exact loop, lower values also catch
      loops whose copies vary.
    * ``loop_max_period`` (64): the longest repeating unit looked for.

    Calibration (ours): :meth:`with_calibrated_threshold` sets ``threshold`` from a pair's own
    overlap statistics instead of the absolute 0.7, which on a real pair flags tokens in proportion
    to the pair's baseline disagreement rather than to drift.

    Dynamic window between training steps (:class:`DynamicWindow`; off when ``window`` is None):

    * ``window`` (None): the initial length cap ``L0`` (the authors use 1024-2048 on 12k-token math
      rollouts). None: no cap from pruning, the caller's ``max_new_tokens`` alone bounds length.
    * ``window_min`` (128) / ``window_max`` (None = no upper bound): the range of ``L``.
    * ``window_step`` (100): how much ``L`` grows or shrinks at a time.
    * ``window_margin`` (32, ours): a rollout "hits" the cap when its effective length (tokens with
      weight > 0) is at least ``max(window_min, L - window_margin)``.
    * ``window_hit_ratio`` (0.1): grow when at least this fraction of the batch hits.
    * ``window_shrink_patience`` (3): shrink after this many consecutive steps whose hit fraction is
      below ``window_hit_ratio``.

    ``PruneConfig.disabled()`` is plain OPD: multiplier 1 on every token, no stop, no window.
    Invalid values raise ``ValueError`` / ``TypeError`` at construction (see :meth:`validate`).
    """

    k: int = 16
    ema_beta: float = 0.0
    threshold: float = 0.7
    warmup: int = 0
    w_drop: float = 0.01
    decay: Optional[float] = None
    w_base: float = 0.5
    min_weight: Optional[float] = 0.0
    patience: Optional[int] = None
    window: Optional[int] = None
    window_min: int = 128
    window_max: Optional[int] = None
    window_step: int = 100
    window_margin: int = 32
    window_hit_ratio: float = 0.1
    window_shrink_patience: int = 3
    loop_window: Optional[int] = None
    loop_match: float = 0.5
    loop_max_period: int = 64

    def __post_init__(self):
        self.validate()

    @classmethod
    def disabled(cls, k: int = 16) -> PruneConfig:
        """Plain OPD: overlaps are still tracked, but every multiplier is 1 and nothing stops."""
        return cls(k=k, w_drop=0.0, w_base=0.0, min_weight=None, patience=None, window=None)

    @property
    def is_disabled(self) -> bool:
        return (
            self.w_drop == 0.0
            and self.decay is None
            and self.w_base == 0.0
            and self.patience is None
            and self.loop_window is None
        )

    def with_calibrated_threshold(
        self, overlaps: torch.Tensor, mask: Optional[torch.Tensor] = None, *, quantile: float = 0.05
    ) -> PruneConfig:
        """This config with ``threshold`` set to the ``quantile`` of the (EMA-smoothed, as the
        monitor sees them) overlaps of reference rollouts that have *not* drifted: the teacher's
        own rollouts scored by the student, or the student's before training on prompts it
        handles. At most a ``quantile`` fraction of such tokens then count as drift events, whatever
        the pair's baseline overlap.

        Args:
            overlaps: float32 ``[B, T]`` top-k overlaps at this config's ``k`` (``opd_ext.topk_overlap``
                or a :class:`~opd_ext.generation.Rollout`'s ``overlaps``).
            mask: bool ``[B, T]``, the positions holding tokens (default: all).
            quantile: in ``(0, 1)``.

        Raises:
            ValueError: no valid position, a quantile outside ``(0, 1)``, or shapes that differ.
        """
        _check_overlaps(overlaps, mask)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")
        valid = torch.ones_like(overlaps, dtype=torch.bool) if mask is None else mask
        smoothed = overlaps.clone()
        if self.ema_beta > 0.0:  # as the monitor smooths: over a row's own tokens, from its first one
            previous, seen = overlaps[:, 0].clone(), torch.zeros_like(valid[:, 0])
            for t in range(overlaps.shape[1]):
                current = overlaps[:, t]
                ema = torch.where(seen, self.ema_beta * previous + (1.0 - self.ema_beta) * current, current)
                smoothed[:, t] = ema
                previous, seen = torch.where(valid[:, t], ema, previous), seen | valid[:, t]
        # Drift counts from the warmup-th token of a rollout on; earlier ones never do.
        position = valid.long().cumsum(1) - 1
        values = smoothed[valid & (position >= self.warmup) & ~smoothed.isnan()]
        if values.numel() == 0:
            raise ValueError("with_calibrated_threshold: no valid position past the warmup in the reference overlaps")
        # A drift event is "ema < threshold", strictly: with the quantile's value as the threshold at
        # most that fraction of reference tokens count, also when overlaps take few distinct values.
        return dataclasses.replace(self, threshold=float(torch.quantile(values.double(), quantile)))

    def validate(self) -> PruneConfig:
        """Raise on a setting outside its range; returns self."""

        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"PruneConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        def need_number(name: str):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"PruneConfig.{name} must be a finite number, got {value!r}")

        def need_int(name: str, optional: bool = False):
            value = getattr(self, name)
            if not (_is_int(value) or (optional and value is None)):
                raise TypeError(f"PruneConfig.{name} must be an int{' or None' if optional else ''}, got {value!r}")

        for name in ("k", "warmup", "window_min", "window_step", "window_margin", "window_shrink_patience"):
            need_int(name)
        for name in ("patience", "window", "window_max", "loop_window"):
            need_int(name, optional=True)
        need_int("loop_max_period")
        for name in ("ema_beta", "threshold", "w_drop", "w_base", "window_hit_ratio", "loop_match"):
            need_number(name)
        for name in ("decay", "min_weight"):
            if getattr(self, name) is not None:
                need_number(name)

        need(self.k >= 1, "k", "an int >= 1 (and <= the vocabulary size)")
        need(0.0 <= self.ema_beta < 1.0, "ema_beta", "0 <= ema_beta < 1 (0 = raw overlap)")
        need(0.0 <= self.threshold <= 1.0, "threshold", "an overlap fraction in [0, 1]")
        need(self.warmup >= 0, "warmup", "a token count >= 0")
        need(0.0 <= self.w_drop <= 1.0, "w_drop", "0 <= w_drop <= 1 (the weight lost per drift event)")
        need(self.decay is None or 0.0 < self.decay <= 1.0, "decay", "None (linear schedule) or 0 < decay <= 1")
        need(self.w_base >= 0.0, "w_base", "w_base >= 0")
        need(
            self.min_weight is None or 0.0 <= self.min_weight < 1.0,
            "min_weight",
            "None (never stop on the weight) or 0 <= min_weight < 1",
        )
        need(self.patience is None or self.patience >= 1, "patience", "None or an int >= 1")
        need(self.window_min >= 1, "window_min", "an int >= 1")
        need(
            self.window_max is None or self.window_max >= self.window_min,
            "window_max",
            f"None or an int >= window_min={self.window_min}",
        )
        need(
            self.window is None
            or (self.window >= self.window_min and (self.window_max is None or self.window <= self.window_max)),
            "window",
            f"None or an int in [window_min={self.window_min}, window_max={self.window_max}]",
        )
        need(self.window_step >= 1, "window_step", "an int >= 1")
        need(self.window_margin >= 0, "window_margin", "an int >= 0")
        need(0.0 < self.window_hit_ratio <= 1.0, "window_hit_ratio", "a batch fraction in (0, 1]")
        need(self.window_shrink_patience >= 1, "window_shrink_patience", "an int >= 1")
        need(self.loop_window is None or self.loop_window >= 2, "loop_window", "None (off) or a token count >= 2")
        need(0.0 < self.loop_match <= 1.0, "loop_match", "a fraction of the window in (0, 1]")
        need(self.loop_max_period >= 1, "loop_max_period", "an int >= 1")
        return self

    def kernel_args(self) -> dict:
        """The scalar arguments of the drift ops (``torch.ops.opd_ext.drift_step`` / ``drift_scan``)."""
        return dict(
            ema_beta=float(self.ema_beta),
            threshold=float(self.threshold),
            warmup=int(self.warmup),
            w_drop=float(self.w_drop),
            decay=float(self.decay) if self.decay is not None else 0.0,
            w_base=float(self.w_base),
            patience=int(self.patience) if self.patience is not None else 0,
            min_weight=float(self.min_weight) if self.min_weight is not None else -1.0,
        )


class DynamicWindow:
    """The batch-level length cap ``L`` of Prune-OPD (docs/spec.md §1 item 6), updated between training steps.

    ``L`` starts at ``config.window``. After each rollout batch call :meth:`update` with the rollouts'
    effective lengths (:attr:`DriftMonitor.effective_lengths`): a rollout hits when its effective
    length is at least ``max(window_min, L - window_margin)``; if at least ``window_hit_ratio`` of the
    batch hits, ``L`` grows by ``window_step`` (up to ``window_max``); after ``window_shrink_patience``
    consecutive batches below that fraction it shrinks by ``window_step`` (down to ``window_min``). A
    batch with a few hits but a hit fraction below ``window_hit_ratio`` counts as a batch without
    hits, as in the Prune-OPD authors' trainer. Use
    :attr:`length` as the next batch's budget: ``DriftMonitor(..., budget=window.length)``.
    """

    def __init__(self, config: PruneConfig):
        if config.window is None:
            raise ValueError("DynamicWindow needs PruneConfig.window (the initial length cap L0), got None")
        self.config = config
        self.length = config.window
        self.steps_without_hit = 0

    @property
    def hit_length(self) -> int:
        return max(self.config.window_min, self.length - self.config.window_margin)

    def update(self, effective_lengths: torch.Tensor) -> int:
        """Feed one batch's effective lengths ``[B]``; returns the new ``L``."""
        if not isinstance(effective_lengths, torch.Tensor) or effective_lengths.dim() != 1:
            raise ValueError("effective_lengths must be a 1-d tensor [B] of token counts")
        if effective_lengths.numel() == 0:
            raise ValueError("effective_lengths is empty: update() needs at least one rollout")
        cfg = self.config
        hits = int((effective_lengths >= self.hit_length).sum())
        # One threshold decides both ways, as in the authors' trainer: a batch whose hit fraction is
        # below window_hit_ratio counts as a batch without hits even when a few rollouts hit.
        if hits >= cfg.window_hit_ratio * effective_lengths.numel():
            upper = cfg.window_max if cfg.window_max is not None else NO_BUDGET
            self.length = min(self.length + cfg.window_step, upper)
            self.steps_without_hit = 0
        else:
            self.steps_without_hit += 1
            if self.steps_without_hit >= cfg.window_shrink_patience:
                self.length = max(self.length - cfg.window_step, cfg.window_min)
                self.steps_without_hit = 0
        return self.length

    def state_dict(self) -> dict:
        return {"length": self.length, "steps_without_hit": self.steps_without_hit}

    def load_state_dict(self, state: dict) -> None:
        self.length = int(state["length"])
        self.steps_without_hit = int(state["steps_without_hit"])


class DriftState(NamedTuple):
    """Per-sequence state tensors, all ``[B]``, updated in place by the drift ops."""

    ema: torch.Tensor  # float32
    weight: torch.Tensor  # float32, in [0, 1], non-increasing
    drift_run: torch.Tensor  # int32, consecutive drift events
    drift_events: torch.Tensor  # int32
    length: torch.Tensor  # int32, tokens seen
    stop_reason: torch.Tensor  # int8, StopReason
    budget: torch.Tensor  # int32, length cap (NO_BUDGET = none)

    @classmethod
    def fresh(cls, batch_size: int, device, budget) -> DriftState:
        def full(value, dtype):
            return torch.full((batch_size,), value, dtype=dtype, device=device)

        if isinstance(budget, torch.Tensor):
            if budget.shape != (batch_size,):
                raise ValueError(f"budget must be an int or a tensor [B={batch_size}], got shape {tuple(budget.shape)}")
            if torch.compiler.is_compiling():  # a traced graph cannot branch on tensor values
                torch._assert_async(~(budget < 1).any(), "budget must be >= 1 token for every row")
            elif bool((budget < 1).any()):
                raise ValueError("budget must be >= 1 token for every row")
            # The kernels keep budgets as int32: larger budgets mean "no cap", as for an int budget,
            # instead of wrapping to a negative budget that would stop the row at once.
            budget_tensor = budget.clamp(max=NO_BUDGET).to(device=device, dtype=torch.int32)
        else:
            if budget is not None and (not _is_int(budget) or budget < 1):
                raise ValueError(f"budget must be None (no cap) or an int >= 1, got {budget!r}")
            budget_tensor = full(NO_BUDGET if budget is None else min(budget, NO_BUDGET), torch.int32)
        return cls(
            full(0.0, torch.float32),
            full(1.0, torch.float32),
            full(0, torch.int32),
            full(0, torch.int32),
            full(0, torch.int32),
            full(StopReason.RUNNING, torch.int8),
            budget_tensor,
        )

    def mutable(self) -> tuple:
        return self[:6]


class RepetitionTracker:
    """The degeneration signal of Prune-OPD (``PruneConfig.loop_window``). For every period
    ``p <= loop_max_period`` it counts, over a sequence's last ``loop_window`` tokens, those equal
    to the token ``p`` before them; the sequence is in a loop once some count reaches
    ``ceil(loop_match * loop_window)``. ``loop_match=1`` asks for an exact loop (the last window
    repeats with period ``p``); below 1 it also catches loops whose copies vary (a number that
    changes, a word repeated with a few others between).

    State per sequence: the last ``P`` tokens, a ring of ``W`` match bits per period and the
    counts, updated in O(P) per token on the tokens' device without a device-to-host sync.
    """

    def __init__(self, batch_size: int, config: PruneConfig, device):
        periods, window = config.loop_max_period, config.loop_window
        self.window = window
        self.recent = torch.full((batch_size, periods), -1, dtype=torch.int64, device=device)
        self.bits = torch.zeros(batch_size, periods, window, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch_size, periods, dtype=torch.int32, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.needed = max(1, math.ceil(config.loop_match * window - 1e-9))

    def scan(self, tokens: torch.Tensor, mask: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[A, C]`` of state rows ``rows`` (positions where ``mask`` is False are
        skipped); returns int64 ``[A]``: the first chunk position at which the row is in a loop,
        -1 where it is not."""
        recent, bits = self.recent.index_select(0, rows), self.bits.index_select(0, rows)
        counts, seen = self.counts.index_select(0, rows), self.seen.index_select(0, rows)
        first = torch.full((tokens.shape[0],), -1, dtype=torch.int64, device=tokens.device)
        slot = torch.arange(self.window, device=tokens.device)
        for c in range(tokens.shape[1]):
            token = tokens[:, c : c + 1]
            valid = torch.ones_like(token, dtype=torch.bool) if mask is None else mask[:, c : c + 1]
            match = recent == token  # [A, P]: equal to the token p back (never before the row's p-th token)
            at = (slot == (seen % self.window)[:, None])[:, None, :]  # [A, 1, W]: the ring slot leaving
            leaving = (bits & at).any(-1)
            counts = torch.where(valid, counts + match.int() - leaving.int(), counts)
            bits = torch.where(valid[:, :, None] & at, match[:, :, None], bits)
            recent = torch.where(valid, torch.cat([token, recent[:, :-1]], dim=1), recent)
            seen = seen + valid[:, 0].long()
            looping = valid[:, 0] & (counts >= self.needed).any(-1)
            first = torch.where((first < 0) & looping, c, first)
        self.recent[rows], self.bits[rows], self.counts[rows], self.seen[rows] = recent, bits, counts, seen
        return first


def _check_loop_tokens(config: PruneConfig, tokens, like: torch.Tensor) -> None:
    """``tokens`` is needed (and shaped like ``like`` [A] or [A, C]) when the loop check is on."""
    if config.loop_window is None:
        return
    if tokens is None:
        raise ValueError(
            "PruneConfig.loop_window is set: the repetition check needs the sampled tokens, pass tokens= "
            "(int64, one per overlap)"
        )
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.shape != like.shape:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be int64 of shape {tuple(like.shape)}, got {got}")
    if tokens.device != like.device:
        raise ValueError(f"tokens is on {tokens.device} but the overlaps / state are on {like.device}")


_EAGER_ONLY = (
    "DriftMonitor keeps per-step Python state and runs eagerly; call it outside the compiled "
    "region, or use opd_ext.drift_scan / torch.ops.opd_ext.drift_step inside it"
)


class DriftMonitor:
    """Tracks Prune-OPD drift for a batch of sequences decoded token by token.

    Args:
        batch_size: number of sequences ``B``.
        config: a :class:`PruneConfig` (default ``PruneConfig()``).
        device: where the state lives; must match the logits passed to :meth:`step`.
        group: a process group over which :meth:`step`'s logits are sharded along the vocabulary
            (tensor-parallel lm_head; rank r holds ids ``[vocab_start, vocab_start + V_r)``, tokens
            are global ids). Each step then exchanges ``4k + 9`` floats per row instead of reading
            whole rows (:mod:`opd_ext.distributed`); every rank keeps the same state. ``vocab_start``
            and ``vocab`` (the full V) spare one all_gather of the shard widths per step.
        budget: per-sequence length cap: None (no cap), an int, or an int tensor ``[B]``
            (typically :attr:`DynamicWindow.length`). A row reaching it stops with
            ``StopReason.BUDGET``. Budgets of ``2**31 - 1`` tokens or more (int or int64 tensor)
            mean no cap: the kernels count in int32, and a budget is never wrapped.

    Feed it one token per active row with :meth:`step` (fused decode-step kernel: one read of the
    logits), or a chunk of tokens with :meth:`observe` (chunked / post-hoc scoring); both advance
    the same per-sequence state machine and give identical results on the same tokens.

    History (``[B, T]``, ``T`` = :attr:`num_steps`, the tokens fed so far per row at most; position
    ``j`` of row ``b`` is that row's ``j``-th token, padded after the row stopped):

    * :attr:`overlaps` top-k overlap (float32, 0 in padding),
    * :attr:`weights` the drift weight in ``[0, 1]`` after each token (non-increasing, 0 in padding),
    * :attr:`multipliers` the reward multiplier ``w_base + weight`` (0 in padding): pass it as
      ``weights=`` to ``opd_ext.vopd_loss`` / ``reverse_kl_loss``,
    * :attr:`mask` which positions hold a token,
    * :attr:`student_logprobs`, :attr:`teacher_logprobs`, :attr:`reverse_kl` when :meth:`step` was
      given the sampled tokens (else None; :meth:`observe` does not fill them).

    Per sequence: :attr:`lengths`, :attr:`stopped`, :attr:`stop_reasons`, :attr:`effective_lengths`.

    A row whose logits hold NaN gets a NaN overlap, which counts as drift: that row is
    down-weighted and eventually stopped; other rows are unaffected.
    """

    def __init__(
        self,
        batch_size: int,
        config: Optional[PruneConfig] = None,
        *,
        device="cpu",
        budget=None,
        group=None,
        vocab_start: Optional[int] = None,
        vocab: Optional[int] = None,
    ):
        if not _is_int(batch_size) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        self.config = (config if config is not None else PruneConfig()).validate()
        self.device = check_device(device)
        # Vocab-parallel decoding: step() receives this rank's vocabulary shard of the logits.
        self.group, self._layout = group, dict(vocab_start=vocab_start, vocab=vocab)
        self.reset(batch_size, budget=budget)

    # ---- lifecycle ---------------------------------------------------------------------------
    def reset(self, batch_size: Optional[int] = None, *, budget=None) -> None:
        """Forget every sequence and start a new batch (same size unless given)."""
        if batch_size is not None:
            self.batch_size = batch_size
        self.state = DriftState.fresh(self.batch_size, self.device, budget)
        self._repetition = (
            None if self.config.loop_window is None else RepetitionTracker(self.batch_size, self.config, self.device)
        )
        self.num_steps = 0
        self._capacity = 0
        self._history: dict[str, Optional[torch.Tensor]] = {}
        self._grow(16)

    def _grow(self, capacity: int) -> None:
        def widen(old, dtype):
            new = torch.zeros(self.batch_size, capacity, dtype=dtype, device=self.device)
            if old is not None:
                new[:, : old.shape[1]] = old
            return new

        for name, dtype in (
            ("overlaps", torch.float32),
            ("weights", torch.float32),
            ("multipliers", torch.float32),
            ("mask", torch.bool),
        ):
            self._history[name] = widen(self._history.get(name), dtype)
        for name in ("student_logprobs", "teacher_logprobs", "reverse_kl"):
            if self._history.get(name) is not None:
                self._history[name] = widen(self._history[name], torch.float32)
        self._capacity = capacity

    # ---- the decode step ---------------------------------------------------------------------
    # The monitor's Python state (step count, history capacity) changes at every call, so a traced
    # step would be specialised on it and recompiled at every token. Under torch.compile step and
    # observe run eagerly between graphs (an error with fullgraph=True); the drift ops themselves
    # (opd_ext.drift_scan, torch.ops.opd_ext.drift_step) trace.
    @torch.compiler.disable(reason=_EAGER_ONLY)
    def step(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        tokens=None,
        *,
        rows: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Consume one generated token per row; returns the stop mask.

        Args:
            student_logits, teacher_logits: ``[A, V]`` next-token logits of the rows being decoded
                (raw: top-k ranks ignore temperature).
            tokens: optional int64 ``[A]`` sampled ids; then the token's student / teacher
                log-probs (at ``temperature``) and the reverse KL are recorded in the same pass.
                Required with ``PruneConfig.loop_window`` (the repetition check reads them).
            rows: int64 ``[A]`` distinct indices into the batch for a shrinking active batch (the
                caller drops stopped rows from its models); None means all ``B`` rows, in order.

        Returns:
            bool ``[A]``: True where the row must generate nothing more (stopped now or before;
            rows that had already stopped are not updated).
        """
        if self.group is not None:
            return self._step_vocab_parallel(student_logits, teacher_logits, tokens, rows, temperature)
        check_logit_pair(student_logits, teacher_logits)
        if student_logits.dim() != 2:
            raise ValueError(
                f"student_logits must be [A, V] (one next-token row per sequence), got "
                f"shape {tuple(student_logits.shape)}"
            )
        if student_logits.device != self.device:
            raise ValueError(
                f"student_logits is on {student_logits.device} but the DriftMonitor state is on "
                f"{self.device}; create it with device={student_logits.device!s}"
            )
        num_rows, vocab = student_logits.shape
        check_k(self.config.k, vocab, "PruneConfig.k")
        rows = self._check_rows(rows, num_rows, tokens, vocab)
        temperature = check_temperature(temperature)
        _check_loop_tokens(self.config, tokens, rows)

        positions = self.state.length.index_select(0, rows).long()  # each row's own token index
        was_running = self.state.stop_reason.index_select(0, rows) == StopReason.RUNNING
        out = ops.drift_step(
            student_logits,
            teacher_logits,
            tokens,
            rows,
            *self.state,
            self.config.k,
            temperature,
            **self.config.kernel_args(),
        )
        self.num_steps += 1
        if self.num_steps > self._capacity:
            self._grow(2 * self._capacity)
        if tokens is not None and self._history.get("student_logprobs") is None:
            for name in ("student_logprobs", "teacher_logprobs", "reverse_kl"):
                self._history[name] = torch.zeros(self.batch_size, self._capacity, device=self.device)

        # Rows that had already stopped rewrite their current value (a no-op): cheaper than
        # selecting the running rows, which would need a device-to-host sync.
        def record(name, values):
            hist = self._history[name]
            hist[rows, positions] = torch.where(was_running, values.to(hist.dtype), hist[rows, positions])

        record("overlaps", out.overlap)
        record("weights", self.state.weight.index_select(0, rows))
        record("multipliers", out.multiplier)
        record("mask", torch.ones_like(was_running))
        if tokens is not None:
            record("student_logprobs", out.student_logprob)
            record("teacher_logprobs", out.teacher_logprob)
            record("reverse_kl", out.reverse_kl)
        if self._repetition is None:
            return out.stopped
        loop_at = self._repetition.scan(tokens[:, None], None, rows)
        no_stop = torch.full_like(loop_at, -1)
        return out.stopped | (_stop_on_repetition(self.state.stop_reason, rows, was_running, loop_at, no_stop) >= 0)

    def _step_vocab_parallel(self, student_logits, teacher_logits, tokens, rows, temperature) -> torch.Tensor:
        """step() on vocabulary shards: the overlap and the token statistics from the merged
        shards (exactly the unsharded overlap), then the drift state machine on them."""
        if student_logits.dim() != 2:
            raise ValueError(
                f"student_logits must be [A, V_r] (one next-token row per sequence), got "
                f"shape {tuple(student_logits.shape)}"
            )
        overlap = vocab_parallel_topk_overlap(
            student_logits, teacher_logits, self.config.k, group=self.group, **self._layout
        )
        stats = None
        if tokens is not None:
            stats = vocab_parallel_token_stats(
                student_logits, teacher_logits, tokens, temperature=temperature, group=self.group, **self._layout
            )
        checked = self._check_rows(rows, student_logits.shape[0])
        positions = self.state.length.index_select(0, checked).long()
        was_running = self.state.stop_reason.index_select(0, checked) == StopReason.RUNNING
        self.observe(overlap[:, None], rows=rows, tokens=None if tokens is None else tokens[:, None])
        if stats is not None:
            if self._history.get("student_logprobs") is None:
                for name in ("student_logprobs", "teacher_logprobs", "reverse_kl"):
                    self._history[name] = torch.zeros(self.batch_size, self._capacity, device=self.device)
            for name, values in zip(("student_logprobs", "teacher_logprobs", "reverse_kl"), stats):
                hist = self._history[name]
                hist[checked, positions] = torch.where(was_running, values, hist[checked, positions])
        return self.state.stop_reason.index_select(0, checked) != StopReason.RUNNING

    @torch.compiler.disable(reason=_EAGER_ONLY)
    def observe(
        self,
        overlaps: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        *,
        rows: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Consume a chunk of ``C`` tokens per row at once (chunked mode: the teacher scores the
        student's chunk in one forward). Same result as ``C`` calls of :meth:`step`.

        Args:
            overlaps: float32 ``[A, C]`` top-k overlaps of the chunk's tokens
                (``opd_ext.topk_overlap(student_logits, teacher_logits, config.k)`` on ``[A, C, V]``).
            mask: bool ``[A, C]``, False at positions that hold no token (after EOS); None = all.
            rows: int64 ``[A]`` distinct batch indices, as in :meth:`step`.
            tokens: int64 ``[A, C]`` the chunk's sampled ids; required with
                ``PruneConfig.loop_window`` (the repetition check), ignored otherwise.

        Returns:
            int64 ``[A]``: the chunk position at which each row stopped, -1 if it did not stop in
            this chunk. Tokens after that position are not part of the rollout.
        """
        _check_overlaps(overlaps, mask)
        if overlaps.device != self.device:
            raise ValueError(f"overlaps is on {overlaps.device} but the DriftMonitor state is on {self.device}")
        _check_loop_tokens(self.config, tokens, overlaps)
        rows = self._check_rows(rows, overlaps.shape[0])
        was_running = self.state.stop_reason.index_select(0, rows) == StopReason.RUNNING
        loop_at = None
        if self._repetition is not None:
            # The repetition check first, on tokens alone: the drift state then consumes the chunk
            # only up to the looping token, as a step-by-step run would have.
            loop_at = self._repetition.scan(tokens, mask, rows)
            mask = _cut_after(mask, overlaps, loop_at)
        chunk = DriftState(*(field.index_select(0, rows) for field in self.state))
        start = chunk.length.long()
        multipliers, weights, stop_positions = ops.drift_scan(overlaps, mask, *chunk, **self.config.kernel_args())
        for full, part in zip(self.state.mutable(), chunk.mutable()):
            full[rows] = part
        if loop_at is not None:
            stop_positions = _stop_on_repetition(self.state.stop_reason, rows, was_running, loop_at, stop_positions)

        steps = overlaps.shape[1]
        valid = torch.ones_like(overlaps, dtype=torch.bool) if mask is None else mask
        t = torch.arange(steps, device=self.device)
        consumed = valid & was_running[:, None] & ((stop_positions[:, None] < 0) | (t <= stop_positions[:, None]))
        positions = start[:, None] + valid.long().cumsum(1) - 1
        self.num_steps += steps
        capacity = self._capacity
        while capacity < self.num_steps:
            capacity *= 2
        if capacity != self._capacity:
            self._grow(capacity)
        r, c = consumed.nonzero(as_tuple=True)
        batch_rows, batch_pos = rows[r], positions[r, c]
        self._history["overlaps"][batch_rows, batch_pos] = overlaps[r, c]
        self._history["weights"][batch_rows, batch_pos] = weights[r, c]
        self._history["multipliers"][batch_rows, batch_pos] = multipliers[r, c]
        self._history["mask"][batch_rows, batch_pos] = True
        return stop_positions

    def finish(self, rows) -> None:
        """Mark rows as stopped from outside (EOS, max_new_tokens): ``rows`` is a bool mask ``[B]``
        or int64 indices. Rows already stopped keep their reason."""
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.batch_size,):
                raise ValueError(
                    f"finish(rows): a bool mask must have shape [B={self.batch_size}], got {tuple(rows.shape)}"
                )
            rows = rows.nonzero().squeeze(-1)
        rows = self._check_rows(rows.long(), rows.numel())
        reason = self.state.stop_reason
        current = reason.index_select(0, rows)
        reason[rows] = torch.where(
            current == StopReason.RUNNING, torch.full_like(current, StopReason.FINISHED), current
        )

    def _check_rows(self, rows, num_rows: int, tokens=None, vocab: int = 0) -> torch.Tensor:
        """Validates ``rows`` (and the sampled ``tokens``) with one device-to-host read at most;
        returns ``rows`` as int64 on the monitor's device (``arange(B)`` for None)."""
        flags = {}
        if rows is None:
            if num_rows != self.batch_size:
                raise ValueError(
                    f"got logits for {num_rows} rows but the monitor tracks B={self.batch_size}; "
                    f"pass rows=<int64 [A] indices of the active rows> for a subset"
                )
            rows = torch.arange(self.batch_size, device=self.device)
        else:
            if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int64, torch.int32) or rows.dim() != 1:
                raise TypeError(f"rows must be an int64 tensor [A] of batch indices, got {rows!r}")
            if rows.shape[0] != num_rows:
                raise ValueError(f"rows has {rows.shape[0]} entries but the logits have {num_rows} rows")
            rows = rows.to(device=self.device, dtype=torch.int64)
            if rows.numel():
                ordered = rows.sort().values
                flags["rows_range"] = (ordered[0] < 0) | (ordered[-1] >= self.batch_size)
                flags["rows_distinct"] = (ordered[1:] == ordered[:-1]).any()
        if tokens is not None:
            if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
                raise TypeError(f"tokens must be an int64 tensor [A={num_rows}], got {tokens!r}")
            if tokens.shape != (num_rows,):
                raise ValueError(f"tokens must have shape [A={num_rows}], got {tuple(tokens.shape)}")
            if tokens.device != self.device:
                raise ValueError(f"tokens is on {tokens.device} but the DriftMonitor state is on {self.device}")
            if tokens.numel():
                flags["tokens_range"] = ((tokens < 0) | (tokens >= vocab)).any()
        if flags:
            bad = dict(zip(flags, torch.stack(list(flags.values())).tolist()))
            if bad.get("rows_range"):
                raise ValueError(
                    f"rows must index the batch: values in [0, {self.batch_size}), got "
                    f"[{int(rows.min())}, {int(rows.max())}]"
                )
            if bad.get("rows_distinct"):
                raise ValueError("rows must be distinct: each sequence gets at most one token per step")
            if bad.get("tokens_range"):
                raise token_range_error(vocab, int(tokens.min()), int(tokens.max()))
        return rows

    # ---- results -----------------------------------------------------------------------------
    def _view(self, name: str) -> Optional[torch.Tensor]:
        hist = self._history.get(name)
        return None if hist is None else hist[:, : self.num_steps]

    @property
    def overlaps(self) -> torch.Tensor:
        return self._view("overlaps")

    @property
    def weights(self) -> torch.Tensor:
        return self._view("weights")

    @property
    def multipliers(self) -> torch.Tensor:
        return self._view("multipliers")

    @property
    def mask(self) -> torch.Tensor:
        return self._view("mask")

    @property
    def student_logprobs(self) -> Optional[torch.Tensor]:
        return self._view("student_logprobs")

    @property
    def teacher_logprobs(self) -> Optional[torch.Tensor]:
        return self._view("teacher_logprobs")

    @property
    def reverse_kl(self) -> Optional[torch.Tensor]:
        return self._view("reverse_kl")

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: tokens consumed per sequence."""
        return self.state.length.long()

    @property
    def stopped(self) -> torch.Tensor:
        """bool ``[B]``: sequences that generate nothing more."""
        return self.state.stop_reason != StopReason.RUNNING

    @property
    def stop_reasons(self) -> torch.Tensor:
        """int8 ``[B]`` :class:`StopReason` codes."""
        return self.state.stop_reason.clone()

    @property
    def effective_lengths(self) -> torch.Tensor:
        """int64 ``[B]``: tokens with weight > 0 (the authors' effective length, for DynamicWindow)."""
        return ((self.weights > 0) & self.mask).sum(-1)

    def active_rows(self) -> torch.Tensor:
        """int64 indices of the sequences still generating (synchronises with the device)."""
        return (~self.stopped).nonzero().squeeze(-1)


class DriftScan(NamedTuple):
    """Result of :func:`drift_scan`. Token-level tensors are ``[B, T]``, 0 where masked or after the stop."""

    multipliers: torch.Tensor  # float32 reward multipliers w_base + weight
    weights: torch.Tensor  # float32 drift weights in [0, 1]
    stop_positions: torch.Tensor  # int64 [B]: index of the token at which the row stopped, -1 if none
    stop_reasons: torch.Tensor  # int8 [B] StopReason
    lengths: torch.Tensor  # int64 [B]: tokens consumed (up to and including the stop)


def _stop_on_repetition(stop_reason, rows, was_running, loop_at, stop_positions) -> torch.Tensor:
    """The rows ``rows`` of ``stop_reason`` that were running before this update, are still running
    after the drift state machine's and are in a loop at ``loop_at`` (>= 0) stop there with
    ``StopReason.REPETITION`` (in place). Returns ``stop_positions`` [A] with those rows' positions."""
    current = stop_reason.index_select(0, rows)
    looping = was_running & (current == StopReason.RUNNING) & (loop_at >= 0)
    stop_reason[rows] = torch.where(looping, StopReason.REPETITION, current).to(stop_reason.dtype)
    return torch.where(looping, loop_at, stop_positions)


def _cut_after(mask: Optional[torch.Tensor], like: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``mask`` (all True when None) with every position after ``position`` [A] (>= 0) False."""
    steps = torch.arange(like.shape[1], device=like.device)
    keep = (position[:, None] < 0) | (steps[None, :] <= position[:, None])
    return keep if mask is None else mask & keep


def _check_overlaps(overlaps, mask):
    if not isinstance(overlaps, torch.Tensor) or overlaps.dim() != 2 or overlaps.dtype != torch.float32:
        raise ValueError(
            f"overlaps must be a float32 tensor [B, T] (from opd_ext.topk_overlap), got "
            f"{overlaps.dtype if isinstance(overlaps, torch.Tensor) else type(overlaps).__name__} "
            f"{tuple(getattr(overlaps, 'shape', ()))}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != overlaps.shape:
            raise ValueError(
                f"mask must be a bool tensor of the shape of overlaps {tuple(overlaps.shape)}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
            )
        if mask.device != overlaps.device:
            raise ValueError(f"mask is on {mask.device} but overlaps on {overlaps.device}")
    check_kernels_for("overlaps", overlaps)


def drift_scan(
    overlaps: torch.Tensor,
    config: Optional[PruneConfig] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    budget=None,
    tokens: Optional[torch.Tensor] = None,
) -> DriftScan:
    """Prune-OPD over whole sequences (post-hoc mode: rollouts from vLLM / SGLang scored in one
    teacher forward). Identical to feeding the tokens one by one to a :class:`DriftMonitor`.

    Args:
        overlaps: float32 ``[B, T]`` per-token top-k overlaps, e.g.
            ``opd_ext.topk_overlap(student_logits, teacher_logits, config.k)`` on ``[B, T, V]`` logits.
        mask: bool ``[B, T]``, False at padding (skipped); None means every position is a token.
        budget: per-row length cap as in :class:`DriftMonitor`.
        tokens: int64 ``[B, T]`` the sampled ids; required with ``PruneConfig.loop_window`` (the
            repetition check), ignored otherwise.

    Truncate row ``b`` after ``stop_positions[b]`` (when >= 0) and weight its tokens by ``multipliers``.
    """
    config = (config if config is not None else PruneConfig()).validate()
    _check_overlaps(overlaps, mask)
    _check_loop_tokens(config, tokens, overlaps)
    batch = overlaps.shape[0]
    loop_at = None
    if config.loop_window is not None:
        rows = torch.arange(batch, device=overlaps.device)
        loop_at = RepetitionTracker(batch, config, overlaps.device).scan(tokens, mask, rows)
        mask = _cut_after(mask, overlaps, loop_at)
    state = DriftState.fresh(batch, overlaps.device, budget)
    multipliers, weights, stop_positions = ops.drift_scan(overlaps, mask, *state, **config.kernel_args())
    if loop_at is not None:
        fresh = torch.ones(batch, dtype=torch.bool, device=overlaps.device)
        stop_positions = _stop_on_repetition(state.stop_reason, rows, fresh, loop_at, stop_positions)
    return DriftScan(multipliers, weights, stop_positions, state.stop_reason.clone(), state.length.long())
