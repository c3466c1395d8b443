"""TRL integration: :class:`OPDTrainer`, TRL's ``DistillationTrainer`` with the vOPD loss and Prune-OPD.

Supported TRL versions: ``trl>=1.16.0,<1.17.0``, tested with trl 1.16.0 (with transformers 5.24,
peft 0.21, accelerate 1.15, torch 2.14; CPU, one process). The trainer overrides
``DistillationTrainer`` methods that are not a public TRL API (its generation and loss hooks) and
TRL reshapes them between minor releases, so the installed version is checked when a trainer is
built and versions outside that range are refused (RuntimeError naming the pip command).

Switching from TRL's trainer is a change of class (and of config class, for the options)::

    import opd_ext
    from opd_ext.integrations.trl import OPDConfig, OPDTrainer

    trainer = OPDTrainer(model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
                         args=OPDConfig(output_dir="out", baseline="full"),
                         prune=opd_ext.PruneConfig())
    trainer.train()

What changes against ``DistillationTrainer`` (details, logged metrics and limits: docs/trl.md):

* **Loss**: ``opd_ext.vopd_loss`` (``OPDConfig.baseline``: ``"full"`` = vOPD, ``"topk"``, ``"none"`` =
  plain OPD) on the student's and teacher's logits, or with ``OPDConfig.fused_linear=True``
  ``opd_ext.fused_linear_vopd_loss`` on their last hidden states and lm_heads (no ``[N, V]`` logits).
  Normalised as TRL's loss: by the completion tokens of the whole generation batch over all
  processes divided by the number of processes, so results do not depend on
  ``gradient_accumulation_steps``.
* **Generation** with ``prune=opd_ext.PruneConfig(...)``: with transformers, rollouts come from
  ``opd_ext.generation.generate_with_pruning`` (student and teacher in lockstep, drifted rows stopped
  and dropped from the batch) inside TRL's ``unwrap_model_for_generation``; with vLLM
  (``use_vllm=True``), vLLM's rollouts are truncated post hoc by ``opd_ext.generation.score_rollouts``
  (saves training tokens, not generation time). The Prune-OPD multipliers weight the loss.
  Without ``prune``, generation is TRL's own.
* **Logged** ``loss``: the weighted mean reverse KL ``Σ_t w_t KL(p_t‖q_t) / norm`` (the objective whose
  gradient the vOPD surrogate estimates; its gradient is the surrogate's), plus ``opd/*`` metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

SUPPORTED_TRL_VERSIONS = ">=1.16.0,<1.17.0"
TESTED_TRL_VERSIONS = ("1.16.0",)
_INSTALL = f"pip install 'trl{SUPPORTED_TRL_VERSIONS}'"

try:
    import trl
except ImportError as error:
    raise ImportError(
        f"opd_ext.integrations.trl needs TRL ({SUPPORTED_TRL_VERSIONS}), which is not installed: {_INSTALL}"
    ) from error
try:
    from trl import DistillationConfig, DistillationTrainer
    from trl.extras.profiling import profiling_context
    from trl.models.utils import unwrap_model_for_generation
    from trl.trainer.utils import get_config_model_id, pad
except ImportError as error:
    raise ImportError(
        f"opd_ext.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS}; the installed trl "
        f"{getattr(trl, '__version__', '?')} lacks {error.name or 'a module it uses'} ({error}): "
        f"{_INSTALL}"
    ) from error
from accelerate.utils import is_peft_model

from opd_ext._validation import check_choice
from opd_ext.fused_linear import fused_linear_vopd_loss
from opd_ext.generation import Rollout, generate_with_pruning, score_rollouts
from opd_ext.generation.models import forward_parameters, position_ids
from opd_ext.losses import align_vocab, topk_overlap, vopd_loss
from opd_ext.objective import BASELINES, DEFAULT_TOPK
from opd_ext.prune import DynamicWindow, PruneConfig, StopReason

__all__ = ["OPDConfig", "OPDTrainer", "SUPPORTED_TRL_VERSIONS", "TESTED_TRL_VERSIONS", "check_trl_version"]

# Generation settings the Prune-OPD decode loop honours; anything else in TRL's generation kwargs
# would silently change what HF generate() samples but not what the loop samples.
_LOOP_GENERATION_KEYS = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
}

# Config attributes (of the model's text config) by which transformers' model families rescale or cap
# their logits around the lm_head: Cohere (logit_scale), Granite (logits_scaling), Falcon-H1
# (lm_head_multiplier), Gemma 2/3/4 and nanochat (final_logit_softcapping), models with an
# output_multiplier, Inkling (logits_mup_width_multiplier, dividing the hidden state before the head).
# The fused-linear loss forms the logits from the head alone and would miss them; any transform not
# named here is caught by the probe in OPDTrainer._check_plain_head.
_LOGIT_POSTPROCESSING = (
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
    "final_logit_softcapping",
    "logits_mup_width_multiplier",
)


def check_trl_version(version: Optional[str] = None) -> str:
    """Checks a TRL version (default: the installed one) against :data:`SUPPORTED_TRL_VERSIONS`.

    Returns the version string. Raises RuntimeError, naming the installed and the supported versions
    and the pip command, when it is outside the range (pre-releases of a supported version count).
    """
    from packaging.specifiers import SpecifierSet

    version = trl.__version__ if version is None else version
    if not SpecifierSet(SUPPORTED_TRL_VERSIONS).contains(version, prereleases=True):
        raise RuntimeError(
            f"opd_ext.integrations.trl supports trl{SUPPORTED_TRL_VERSIONS} (tested: "
            f"{', '.join(TESTED_TRL_VERSIONS)}), but trl {version} is installed: OPDTrainer overrides "
            f"DistillationTrainer internals that change between TRL releases. Install a supported version: "
            f"{_INSTALL}"
        )
    return version


@dataclass
class OPDConfig(DistillationConfig):
    r"""Configuration of :class:`OPDTrainer`: TRL's ``DistillationConfig`` plus the options below.

    Every ``DistillationConfig`` field keeps its meaning, except ``beta`` (TRL's JSD interpolation),
    which must stay ``1.0``: the vOPD loss trains the reverse KL. ``temperature`` is the sampling
    temperature and the loss temperature, as in TRL.

    Parameters:
        baseline (`str`, defaults to `"full"`): the vOPD baseline of ``opd_ext.vopd_loss``: `"full"`
            (vOPD, ``b = -KL(p‖q)`` over the full vocabulary), `"topk"` (KL over the student's
            `baseline_topk` most likely ids), `"none"` (plain OPD, the sampled-token reward alone).
        baseline_topk (`int`, defaults to `100`): k of the `"topk"` baseline.
        fused_linear (`bool`, defaults to `False`): compute the loss from the last hidden states and
            lm_heads (``opd_ext.fused_linear_vopd_loss``), a chunk of rows at a time, instead of from
            ``[B, T, V]`` logits. Not for models that rescale or soft-cap their logits after the head.
        fused_linear_chunk_size (`int`, *optional*): rows per chunk of the fused-linear loss (default:
            ``opd_ext.fused_linear.default_chunk_size``).
        prune_chunk_size (`int`, defaults to `1`): with Prune-OPD and transformers generation, student
            tokens per teacher forward (``generate_with_pruning(chunk_size=...)``): 1 runs the teacher
            in lockstep, C > 1 calls it C times less often for at most C - 1 wasted tokens per
            stopped row.
        overlap_k (`int`, defaults to `16`): k of the logged top-k overlap when Prune-OPD is off (with
            Prune-OPD the overlap its monitor computed, at ``PruneConfig.k``, is logged).
    """

    baseline: str = field(
        default="full",
        metadata={
            "help": "vOPD baseline: 'full' (vOPD), 'topk' (top-k KL baseline) or 'none' (plain OPD).",
            "choices": list(BASELINES),
        },
    )
    baseline_topk: int = field(
        default=DEFAULT_TOPK,
        metadata={"help": "k of the 'topk' baseline (the student's k most likely ids)."},
    )
    fused_linear: bool = field(
        default=False,
        metadata={"help": "Compute the loss from hidden states and lm_head weights, without [B, T, V] logits."},
    )
    fused_linear_chunk_size: Optional[int] = field(
        default=None,
        metadata={"help": "Rows per chunk of the fused-linear loss (default: a 256 MiB float32 logits budget)."},
    )
    prune_chunk_size: int = field(
        default=1,
        metadata={"help": "Prune-OPD generation: student tokens per teacher forward (1 = lockstep)."},
    )
    overlap_k: int = field(
        default=16,
        metadata={"help": "k of the logged top-k overlap when Prune-OPD is off."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_options(self)


_OPD_FIELDS = ("baseline", "baseline_topk", "fused_linear", "fused_linear_chunk_size", "prune_chunk_size", "overlap_k")
_OPD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OPDConfig) if f.name in _OPD_FIELDS}


@dataclass(frozen=True)
class _Options:
    baseline: str
    baseline_topk: int
    fused_linear: bool
    fused_linear_chunk_size: Optional[int]
    prune_chunk_size: int
    overlap_k: int


def _check_count(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def _check_options(args) -> _Options:
    """The OPD options of ``args`` (an :class:`OPDConfig`, or a plain ``DistillationConfig``, whose
    options take their defaults), checked."""
    options = _Options(**{name: getattr(args, name, default) for name, default in _OPD_DEFAULTS.items()})
    check_choice("baseline", options.baseline, BASELINES)
    _check_count("baseline_topk", options.baseline_topk)
    _check_count("fused_linear_chunk_size", options.fused_linear_chunk_size, allow_none=True)
    _check_count("prune_chunk_size", options.prune_chunk_size)
    _check_count("overlap_k", options.overlap_k)
    if not isinstance(options.fused_linear, bool):
        raise ValueError(f"fused_linear must be a bool, got {options.fused_linear!r}")
    if args.beta != 1.0:
        raise ValueError(
            f"beta={args.beta}: OPDTrainer trains the reverse KL with the vOPD estimator, so TRL's JSD "
            f"interpolation beta must stay 1.0 (choose the estimator with `baseline`)"
        )
    return options


@contextlib.contextmanager
def _eval_mode(*models):
    """Models in eval() mode (no dropout while sampling), their previous modes restored after."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """float32 ``[B, width]``: ``values`` ``[B, T']`` cut or zero-padded on the right."""
    out = values.new_zeros(values.shape[0], width, dtype=torch.float32)
    keep = min(width, values.shape[1])
    out[:, :keep] = values[:, :keep]
    return out


class OPDTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` trained with the vOPD loss, and Prune-OPD during generation.

    Arguments are ``DistillationTrainer``'s (same order), plus:

    Args:
        args: :class:`OPDConfig` (default: ``OPDConfig("<model>-OPD")``); a plain
            ``DistillationConfig`` is accepted, its OPD options taking their defaults.
        prune: ``opd_ext.PruneConfig`` to run Prune-OPD; None (default) keeps TRL's generation and
            trains every token with weight 1. With ``PruneConfig.window`` set, the dynamic length cap
            (``opd_ext.DynamicWindow``) is updated after each training generation batch from the
            rollouts of every process.

    Inputs each micro-batch carries besides TRL's: ``opd_weights`` and ``opd_overlaps``, float32
    ``[B, T]`` (Prune-OPD multipliers and top-k overlaps per completion token; only with ``prune``).

    Raises:
        RuntimeError: the installed TRL is outside :data:`SUPPORTED_TRL_VERSIONS`.
        ValueError: no ``teacher_model``; ``beta != 1``; bad OPD options; a vision-language
            processing class; with ``prune``: tools, or (transformers generation) sampling settings the
            decode loop does not implement (``min_p``, ``repetition_penalty != 1``,
            ``cache_implementation``, other ``generation_kwargs``); with ``fused_linear``: a student or
            teacher that rescales or soft-caps its logits after the lm_head.
        TypeError: ``prune`` is not an ``opd_ext.PruneConfig``.
    """

    _tag_names = ["trl", "distillation", "opd", "opd_ext"]
    _name = "OPD"

    def __init__(
        self, model, teacher_model=None, args=None, *trainer_args, prune: Optional[PruneConfig] = None, **trainer_kwargs
    ):
        check_trl_version()
        if teacher_model is None:
            raise ValueError(
                "OPDTrainer needs a local teacher_model (a model id, a path or a PreTrainedModel): "
                "the loss and Prune-OPD read the teacher's logits"
            )
        if prune is not None and not isinstance(prune, PruneConfig):
            raise TypeError(f"prune must be an opd_ext.PruneConfig or None, got {type(prune).__name__}")
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = OPDConfig(f"{name.split('/')[-1]}-OPD")
        self.opd_options = _check_options(args)
        self.prune = None if prune is None else prune.validate()
        super().__init__(model, teacher_model, args, *trainer_args, **trainer_kwargs)

        if self._is_vlm:
            raise ValueError("OPDTrainer trains text-only models: its loss does not pass images to the models")
        if self.prune is not None and self.tools:
            raise ValueError(
                "Prune-OPD does not run tool-calling rollouts (a tool response would resume a stopped "
                "row): pass prune=None to train with tools"
            )
        if self.prune is not None and not self.use_vllm:
            self._sampling = self._loop_sampling()
        sampling = (self.args.generation_kwargs or {}).get("temperature")
        if sampling is not None and sampling != self.temperature:
            # TRL samples with generation_kwargs' temperature but computes its loss (and opd_ext its
            # vOPD loss and drift scores) at `temperature`: the loss would train a distribution other
            # than the one the rollouts came from.
            raise ValueError(
                f"generation_kwargs['temperature']={sampling} differs from temperature={self.temperature}: "
                f"OPDConfig.temperature is both the sampling and the loss temperature; set "
                f"temperature={sampling} and remove it from generation_kwargs"
            )
        if self.opd_options.fused_linear:
            for name, lm in (("student", self.model), ("teacher", self.teacher_model)):
                self._check_plain_head(name, lm)
        self._window = None if self.prune is None or self.prune.window is None else DynamicWindow(self.prune)
        self._rollout: Optional[Rollout] = None
        self._opd_totals = {"tokens_generated": 0, "tokens_saved": 0}

    # ---- configuration checks -------------------------------------------------------------------

    def _loop_sampling(self) -> dict:
        """``generate_with_pruning`` sampling arguments from TRL's generation kwargs (the
        ``DistillationConfig`` fields merged with ``generation_kwargs``), refusing what the loop cannot do."""
        gen = self.generation_kwargs
        refused = []
        if gen.get("min_p") is not None:
            refused.append(f"min_p={gen['min_p']}")
        if gen.get("repetition_penalty") not in (None, 1.0):
            refused.append(f"repetition_penalty={gen['repetition_penalty']}")
        if gen.get("cache_implementation") is not None:
            refused.append(f"cache_implementation={gen['cache_implementation']!r}")
        extra = sorted(
            set(self.args.generation_kwargs or {})
            - _LOOP_GENERATION_KEYS
            - {"min_p", "repetition_penalty", "cache_implementation"}
        )
        refused += [f"generation_kwargs[{key!r}]" for key in extra]
        if refused:
            raise ValueError(
                f"Prune-OPD generation samples with temperature / top_k / top_p only; unset "
                f"{', '.join(refused)}, or pass prune=None to generate with transformers' generate()"
            )
        max_new_tokens = gen.get("max_new_tokens")
        if max_new_tokens is None:
            raise ValueError("Prune-OPD generation needs max_completion_length (the completion length limit)")
        top_k, top_p = gen.get("top_k"), gen.get("top_p")
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": gen.get("do_sample", True),
            "temperature": gen.get("temperature") or 1.0,
            "top_k": top_k or None,  # TRL's 0 = no top-k filtering
            "top_p": None if top_p is None or top_p >= 1.0 else top_p,
        }

    def _check_plain_head(self, name: str, model) -> None:
        """fused_linear=True forms logits as lm_head(last hidden state): refuse a model whose logits are
        anything else, by its config (the known attributes) and by a probe (one forward of four tokens,
        its logits against lm_head of its backbone's last hidden state), so that a transform under
        any other name, remote code included, is refused too instead of silently skipped."""
        config = model.config.get_text_config()
        found = {
            attr: getattr(config, attr)
            for attr in _LOGIT_POSTPROCESSING
            if getattr(config, attr, None) not in (None, 1, 1.0)
        }
        if found:
            raise ValueError(
                f"fused_linear=True forms the {name}'s logits as lm_head(hidden) but its config "
                f"post-processes them ({found}); use fused_linear=False"
            )
        head = model.get_output_embeddings()
        device = next(model.parameters()).device
        # Ids 1..4, not 0: a padding id may have a zero embedding, whose logits are 0 whatever the scale.
        vocab = config.vocab_size
        ids = (torch.arange(1, 5, device=device) % vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = self._completion_logits(model, ids, mask, 3).float()
                from_head = head(self._completion_hidden(model, ids, mask, 3)).float()
        finally:
            model.train(was_training)
        tolerance = 1e-4 if logits.dtype == torch.float32 and head.weight.dtype == torch.float32 else 2e-2
        gap = (logits - from_head).abs().max()
        if not bool(gap <= tolerance * logits.abs().max().clamp(min=1.0)):
            raise ValueError(
                f"fused_linear=True forms the {name}'s logits as lm_head(last hidden state), but its forward "
                f"returns other logits (largest difference {float(gap):.3g} on a four-token probe): it "
                f"transforms them after or before the head (a soft-cap or scale under a name opd_ext does "
                f"not know, or remote code); use fused_linear=False"
            )

    # ---- generation ------------------------------------------------------------------------------

    def _generation_temperature(self) -> float:
        return self.generation_kwargs.get("temperature") or 1.0

    def _budget(self) -> Optional[int]:
        return None if self._window is None else self._window.length

    def _left_padded(self, prompt_ids: list) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[B, P]`` left-padded prompt ids and their attention mask, on the training device."""
        device = self.accelerator.device
        rows = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left")
        mask = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="left")
        return ids.to(device), mask.to(device)

    @contextlib.contextmanager
    def _unwrapped_student(self, name: str):
        # TRL's own generation context: DDP / DeepSpeed / PEFT unwrapping, ZeRO-3 parameter gathering,
        # gradient checkpointing off, FSDP1 full parameters; the models in eval mode while sampling.
        with (
            profiling_context(self, name),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as student,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            _eval_mode(student, self.teacher_model),
        ):
            yield student

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """TRL's hook returning each prompt's completion ids (lists of ints, through the first EOS).

        With Prune-OPD, the rollouts are those of ``generate_with_pruning`` (transformers) or vLLM's
        truncated by ``score_rollouts``; each list ends where its row stopped. The :class:`Rollout` is
        kept for :meth:`_generate_and_score_completions`.
        """
        if self.prune is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        if images is not None or multimodal_fields:
            raise ValueError("Prune-OPD generation takes text prompts only")
        if self.use_vllm:
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            rollout = self._prune_post_hoc(prompt_ids, completion_ids)
            if rollout is None:
                return completion_ids
        else:
            rollout = self._generate_with_pruning(prompt_ids)
        self._rollout = rollout
        lengths = rollout.completion_mask.sum(1).tolist()
        return [row[:n].tolist() for row, n in zip(rollout.completions.cpu(), lengths)]

    def _generate_with_pruning(self, prompt_ids: list) -> Rollout:
        input_ids, attention_mask = self._left_padded(prompt_ids)
        with self._unwrapped_student("opd_ext.generation.generate_with_pruning") as student:
            # The teacher's forwards go through its own wrapper, which gathers sharded parameters.
            return generate_with_pruning(
                student,
                self.teacher_model,
                input_ids,
                attention_mask,
                config=self.prune,
                chunk_size=self.opd_options.prune_chunk_size,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                budget=self._budget(),
                **self._sampling,
            )

    def _prune_post_hoc(self, prompt_ids: list, completion_ids: list) -> Optional[Rollout]:
        """vLLM's rollouts scored by one student and one teacher forward, cut where Prune-OPD would
        have stopped them; None when every completion is empty (nothing to score)."""
        if not any(completion_ids):
            return None
        input_ids, prompt_mask = self._left_padded(prompt_ids)
        rows = [torch.tensor(ids, dtype=torch.long) for ids in completion_ids]
        completions = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="right")
        completion_mask = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="right")
        sequences = torch.cat([input_ids, completions.to(input_ids.device)], dim=1)
        with self._unwrapped_student("opd_ext.generation.score_rollouts") as student:
            return score_rollouts(
                student,
                self.teacher_model,
                sequences,
                input_ids.shape[1],
                attention_mask=prompt_mask,
                completion_mask=completion_mask.to(input_ids.device).bool(),
                config=self.prune,
                temperature=self._generation_temperature(),
                eos_token_id=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                budget=self._budget(),
            )

    def _generate_and_score_completions(self, inputs):
        """TRL's batch (prompt / completion ids and masks, ``num_items_in_batch``) plus, with
        Prune-OPD, ``opd_weights`` and ``opd_overlaps`` float32 ``[B, T]`` aligned with
        ``completion_ids``; logs the rollouts' costs."""
        self._rollout = None
        output = super()._generate_and_score_completions(inputs)
        rollout, self._rollout = self._rollout, None
        if rollout is not None:
            width = output["completion_ids"].shape[1]
            output["opd_weights"] = _fit(rollout.multipliers, width)
            output["opd_overlaps"] = _fit(rollout.overlaps, width)
            self._log_rollout(rollout)
        return output

    def _log_rollout(self, rollout: Rollout) -> None:
        mode = "train" if self.model.training else "eval"
        reasons = rollout.stop_reason
        pruned = torch.isin(reasons, torch.tensor(StopReason.PRUNED, dtype=reasons.dtype, device=reasons.device))
        device = self.accelerator.device
        counts = torch.tensor(
            [
                rollout.tokens_generated,
                rollout.tokens_saved,
                rollout.teacher_tokens,
                int(pruned.sum()),
                reasons.numel(),
            ],
            dtype=torch.int64,
            device=device,
        )
        totals = self.accelerator.gather(counts).reshape(-1, counts.numel()).sum(0).tolist()
        generated, saved, teacher_tokens, pruned_rows, rows = totals
        metrics = self._metrics[mode]
        metrics["opd/tokens_generated"].append(float(generated))
        metrics["opd/tokens_saved"].append(float(saved))
        metrics["opd/teacher_tokens"].append(float(teacher_tokens))
        metrics["opd/pruned_fraction"].append(pruned_rows / max(rows, 1))
        if mode == "train":
            self._opd_totals["tokens_generated"] += generated
            self._opd_totals["tokens_saved"] += saved
            if self._window is not None:
                self._window.update(self.accelerator.gather(rollout.effective_lengths.to(device)))
            for key, total in self._opd_totals.items():  # running totals, replaced rather than averaged
                metrics[f"opd/{key}_total"] = [float(total)]
        if self._window is not None:
            metrics["opd/window"].append(float(self._window.length))

    # ---- loss ------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The vOPD loss of one micro-batch (a float32 scalar); logs the ``opd/*`` token statistics.

        While training, the normaliser is TRL's: ``inputs["num_items_in_batch"]`` (completion tokens
        of the whole generation batch, all processes) over the number of processes, so the
        micro-batch losses of an optimiser step add up to the token mean of that step and data
        parallelism's gradient averaging is compensated. In evaluation, the mean over the micro-batch.
        """
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        # Through the wrapper's forward, as TRL does: DDP's prepare_for_backward fires, FSDP /
        # DeepSpeed keep the student's sharded parameters (lm_head included) gathered.
        unwrapped_student = self.accelerator.unwrap_model(model)
        loss, sums = self._forward_redirection(
            model, unwrapped_student, self._compute_loss, unwrapped_student, inputs, num_items_in_batch
        )
        # Collectives outside the wrapped forward (a hang / ordering risk inside it).
        self._log_loss_sums(sums)
        return (loss, None) if return_outputs else loss

    def _completion_logits(self, model, input_ids, attention_mask, steps: int) -> torch.Tensor:
        """``[B, steps, V]``: the logits that predicted the last ``steps`` tokens."""
        keys = forward_parameters(model)  # the innermost model's: wrappers take **kwargs
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "position_ids" in keys:
            kwargs["position_ids"] = position_ids(attention_mask)
        if "logits_to_keep" in keys:
            kwargs["logits_to_keep"] = steps + 1
        return model(**kwargs).logits[:, -steps - 1 : -1]

    def _completion_hidden(self, unwrapped, input_ids, attention_mask, steps: int) -> torch.Tensor:
        """``[B, steps, H]``: the last hidden states fed to the lm_head for the last ``steps`` tokens.

        Runs the backbone (``model.base_model``, LoRA layers included for a PEFT model) without the head.
        """
        model = unwrapped.base_model.model if is_peft_model(unwrapped) else unwrapped
        backbone = model.base_model
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "position_ids" in inspect.signature(backbone.forward).parameters:
            kwargs["position_ids"] = position_ids(attention_mask)
        return backbone(**kwargs).last_hidden_state[:, -steps - 1 : -1]

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """``(loss, sums)``: the loss (value: weighted mean reverse KL; gradient: the vOPD surrogate's)
        and a detached float32 ``[8]`` of token sums for :meth:`_log_loss_sums`."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        steps = completion_ids.shape[1]
        weights, overlaps = inputs.get("opd_weights"), inputs.get("opd_overlaps")
        options = self.opd_options
        common = dict(
            mask=mask,
            weights=weights,
            temperature=self.temperature,
            baseline=options.baseline,
            topk=options.baseline_topk,
            num_items=num_items_in_batch,
            return_stats=True,
        )

        teacher = self.teacher_model
        teacher.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(teacher)
        if options.fused_linear:
            student_hidden = self._completion_hidden(unwrapped_student, input_ids, attention_mask, steps)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    teacher,
                    unwrapped_teacher,
                    self._completion_hidden,
                    unwrapped_teacher,
                    input_ids,
                    attention_mask,
                    steps,
                )
            student_head = unwrapped_student.get_output_embeddings()
            teacher_head = unwrapped_teacher.get_output_embeddings()
            student_dtype = next(student_head.parameters()).dtype
            teacher_dtype = next(teacher_head.parameters()).dtype
            # The kernels take the head's dtype; under mixed precision the backbone may return another,
            # and an autocast matmul would round the chunk logits the loss differentiates.
            with torch.autocast(device_type=student_hidden.device.type, enabled=False):
                loss, stats = fused_linear_vopd_loss(
                    student_hidden.to(student_dtype),
                    student_head,
                    completion_ids,
                    teacher_hidden=teacher_hidden.to(teacher_dtype),
                    teacher_weight=teacher_head,
                    chunk_size=options.fused_linear_chunk_size,
                    **common,
                )
        else:
            student_logits = self._completion_logits(unwrapped_student, input_ids, attention_mask, steps)
            with torch.no_grad():
                teacher_logits = self._completion_logits(teacher, input_ids, attention_mask, steps)
            student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
            loss, stats = vopd_loss(student_logits, teacher_logits, completion_ids, **common)
            if overlaps is None:
                k = min(options.overlap_k, student_logits.shape[-1])
                overlaps = topk_overlap(student_logits.detach(), teacher_logits, k)

        # The surrogate's value (Σ w·A·log p) says nothing about training progress; report the
        # weighted reverse KL its gradient estimates, in the same normalisation, keeping its gradient.
        norm = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        norm = torch.as_tensor(norm, dtype=torch.float32, device=loss.device)
        value = (stats.weights * stats.reverse_kl).sum() / norm
        loss = loss + (value - loss).detach()

        valid = stats.mask
        count = valid.sum().float()
        advantage = stats.advantage
        overlap_sum = (
            torch.zeros((), device=loss.device)
            if overlaps is None
            else torch.where(valid, overlaps.to(valid.device).float(), 0.0).sum()
        )
        sums = torch.stack(
            [
                count,
                stats.reverse_kl.sum(),
                stats.reward.sum(),
                advantage.sum(),
                (advantage * advantage).sum(),
                stats.weights.sum(),
                overlap_sum,
                count if overlaps is not None else torch.zeros((), device=loss.device),
            ]
        ).detach()
        return loss, sums

    def _log_loss_sums(self, sums: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        (count, kl, reward, advantage, advantage_sq, weight, overlap, overlap_count) = (
            self.accelerator.gather(sums).reshape(-1, sums.numel()).sum(0).tolist()
        )
        if count == 0:
            return
        metrics = self._metrics[mode]
        metrics["opd/reverse_kl"].append(kl / count)
        metrics["opd/reward"].append(reward / count)
        metrics["opd/advantage"].append(advantage / count)
        metrics["opd/advantage_std"].append(math.sqrt(max(advantage_sq / count - (advantage / count) ** 2, 0.0)))
        metrics["opd/multiplier"].append(weight / count)
        if overlap_count:
            metrics["opd/topk_overlap"].append(overlap / overlap_count)
