"""opd_ext.integrations.trl: OPDTrainer end to end on tiny models built from configs (no downloads).

The teacher is a differently seeded random model, so its top-k rarely matches the student's and
Prune-OPD stops rows after a few drift events. Runs on the CPU (``use_cpu``): the comparisons
between two runs (gradient accumulation) need the same device and kernels on both sides.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import opd_ext  # noqa: E402
from opd_ext import PruneConfig, StopReason  # noqa: E402
from opd_ext.integrations.trl import OPDConfig, OPDTrainer, check_trl_version  # noqa: E402

WORDS = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(61)]
VOCAB = len(WORDS)
PAD, EOS = 0, 2
MAX_NEW = 12
# A top-8 overlap below 0.2 (at most one shared id) is a drift event; the fourth one stops the row.
PRUNE = PruneConfig(k=8, threshold=0.2, w_drop=0.25)
DRIFT_STOPS = (StopReason.WEIGHT_EXHAUSTED, StopReason.PATIENCE, StopReason.BUDGET)


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_single_threaded():
    # Tiny matmuls: a second thread only adds synchronisation (and the machine is shared). No
    # telemetry or hub access from the trainer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield
    torch.set_num_threads(threads)


def tokenizer():
    """A word-level tokenizer: whitespace split, one id per word, left padding (as TRL requires)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def tiny_lm(seed: int, arch: str = "llama"):
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return getattr(transformers, model_class)(config)


def prompts(n: int = 16):
    return datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + 3 * j) % 61}" for j in range(2 + i % 4)) for i in range(n)]}
    )


def config(tmp_path, **overrides) -> OPDConfig:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        max_completion_length=MAX_NEW,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return OPDConfig(**values)


def trainer(tmp_path, *, prune=PRUNE, student=None, teacher=None, peft_config=None, **overrides) -> OPDTrainer:
    return OPDTrainer(
        model=student if student is not None else tiny_lm(0),
        teacher_model=teacher if teacher is not None else tiny_lm(1),
        args=config(tmp_path, **overrides),
        train_dataset=prompts(),
        processing_class=tokenizer(),
        peft_config=peft_config,
        prune=prune,
    )


def step_logs(t: OPDTrainer) -> list[dict]:
    return [h for h in t.state.log_history if "loss" in h and "train_loss" not in h]


def spy_rollouts(t: OPDTrainer, method: str = "_generate_with_pruning") -> list:
    """Records the Rollouts the trainer's generation method returns."""
    rollouts, original = [], getattr(t, method)

    def recorded(*args):
        rollout = original(*args)
        rollouts.append(rollout)
        return rollout

    setattr(t, method, recorded)
    return rollouts


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def one_batch(t: OPDTrainer) -> dict:
    """A generated micro-batch of 4 prompts, as the training loop would pass to compute_loss."""
    t.model.train()
    return t._generate_and_score_completions([t.train_dataset[i] for i in range(4)])


def loss_and_grads(t: OPDTrainer, inputs) -> tuple[torch.Tensor, dict]:
    t.model.zero_grad(set_to_none=True)
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def completion_logits(model, inputs):
    """[B, T, V] logits predicting each completion token, from one plain forward."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    steps = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, -steps - 1 : -1]


# ---- end to end -----------------------------------------------------------------------------------


def test_prune_opd_training_stops_rows_and_logs(tmp_path):
    # TRL's default gradient checkpointing: its generation context turns it off while sampling.
    t = trainer(tmp_path, gradient_checkpointing=True)
    rollouts = spy_rollouts(t)
    before = snapshot(t.model)
    t.train()

    assert len(rollouts) == 3
    for rollout in rollouts:
        stopped = torch.isin(rollout.stop_reason, torch.tensor(DRIFT_STOPS, dtype=rollout.stop_reason.dtype))
        assert stopped.any(), rollout.stop_reason_names()
        assert bool((rollout.lengths[stopped] < MAX_NEW).all())
        assert rollout.tokens_saved > 0
    logs = step_logs(t)
    assert len(logs) == 3
    for log, rollout in zip(logs, rollouts):
        assert math.isfinite(log["loss"]) and log["loss"] >= 0.0
        assert log["opd/reverse_kl"] > 0.0 and math.isfinite(log["opd/reverse_kl"])
        assert log["opd/tokens_generated"] == rollout.tokens_generated
        assert log["opd/tokens_saved"] == rollout.tokens_saved > 0
        assert 0.0 < log["opd/pruned_fraction"] <= 1.0
        # One micro-batch per step: the logged means are those of the rollout's kept tokens.
        kept = rollout.completion_mask
        assert log["opd/topk_overlap"] == pytest.approx(float(rollout.overlaps[kept].mean()), rel=1e-5)
        assert log["opd/multiplier"] == pytest.approx(float(rollout.multipliers[kept].mean()), rel=1e-5)
        assert PRUNE.w_base <= log["opd/multiplier"] <= PRUNE.w_base + 1.0
        assert math.isfinite(log["opd/advantage"]) and log["opd/advantage_std"] > 0.0
    assert logs[-1]["opd/tokens_saved_total"] == sum(r.tokens_saved for r in rollouts)
    assert logs[-1]["opd/tokens_generated_total"] == sum(r.tokens_generated for r in rollouts)
    after = snapshot(t.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert "lm_head.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed

    metrics = t.evaluate(prompts(4))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_opd/reverse_kl"] > 0.0
    assert "eval_opd/tokens_saved" in metrics


def test_without_prune_generation_is_trls_and_weights_are_one(tmp_path):
    t = trainer(tmp_path, prune=None, max_steps=1)
    t.train()
    (log,) = step_logs(t)
    assert log["opd/multiplier"] == 1.0
    assert 0.0 <= log["opd/topk_overlap"] <= 1.0 and log["opd/reverse_kl"] > 0.0
    assert not any(key.startswith("opd/tokens") for key in log)


def test_vllm_rollouts_are_truncated_post_hoc(tmp_path):
    """The vLLM branch of TRL's generation hook, with a stand-in engine returning full-length
    completions: score_rollouts cuts them where Prune-OPD would have stopped them."""
    t = trainer(tmp_path, max_steps=2)
    calls = {"generate": 0, "sync": 0}

    class Engine:
        def sync_weights(self):
            calls["sync"] += 1

        def generate(self, prompts, images, num_generations, profiler):
            calls["generate"] += 1
            generator = torch.Generator().manual_seed(calls["generate"])
            completions = torch.randint(3, VOCAB, (len(prompts), MAX_NEW), generator=generator).tolist()
            return prompts, completions, None, None

    t.use_vllm, t.vllm_generation, t._last_loaded_step = True, Engine(), -1
    rollouts = spy_rollouts(t, "_prune_post_hoc")
    t.train()

    assert calls == {"generate": 2, "sync": 2}
    for rollout, log in zip(rollouts, step_logs(t)):
        assert rollout.tokens_generated == 4 * MAX_NEW
        assert 0 < rollout.tokens_saved == 4 * MAX_NEW - rollout.tokens_kept
        assert log["opd/tokens_saved"] == rollout.tokens_saved
        assert log["completions/max_length"] < MAX_NEW


# ---- the loss ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_rollout(tmp_path_factory):
    """One trainer and one generated micro-batch, shared by the loss tests (each restores options)."""
    t = trainer(tmp_path_factory.mktemp("fixed"))
    return t, one_batch(t)


@pytest.mark.parametrize("baseline", ["full", "topk", "none"])
def test_baselines_train_the_vopd_surrogate(fixed_rollout, baseline):
    t, inputs = fixed_rollout
    t.opd_options = dataclasses.replace(t.opd_options, baseline=baseline, baseline_topk=8)
    try:
        loss, grads = loss_and_grads(t, inputs)
    finally:
        t.opd_options = dataclasses.replace(t.opd_options, baseline="full", baseline_topk=100)

    # Ground truth: opd_ext.vopd_loss on logits from plain forwards, TRL's normaliser.
    mask = inputs["completion_mask"].bool()
    num_items = inputs["num_items_in_batch"].float()
    student = completion_logits(t.model, inputs)
    with torch.no_grad():
        teacher = completion_logits(t.teacher_model, inputs)
    surrogate = opd_ext.vopd_loss(
        student,
        teacher,
        inputs["completion_ids"],
        mask=mask,
        weights=inputs["opd_weights"],
        baseline=baseline,
        topk=8,
        num_items=num_items,
    )
    t.model.zero_grad(set_to_none=True)
    surrogate.backward()
    for name, p in t.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    t.model.zero_grad(set_to_none=True)

    # The value is the weighted reverse KL, not the surrogate's.
    stats = opd_ext.token_stats(student.detach(), teacher, inputs["completion_ids"])
    expected = (torch.where(mask, inputs["opd_weights"] * stats.reverse_kl, 0.0)).sum() / num_items
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_baselines_give_different_gradients(fixed_rollout):
    t, inputs = fixed_rollout
    grads = {}
    for baseline in ("full", "topk", "none"):
        t.opd_options = dataclasses.replace(t.opd_options, baseline=baseline, baseline_topk=8)
        grads[baseline] = loss_and_grads(t, inputs)[1]["lm_head.weight"]
    t.opd_options = dataclasses.replace(t.opd_options, baseline="full", baseline_topk=100)
    assert not torch.allclose(grads["full"], grads["none"])
    assert not torch.allclose(grads["full"], grads["topk"])


def test_fused_linear_matches_logits_path(fixed_rollout):
    t, inputs = fixed_rollout
    t._metrics["train"].clear()
    loss_logits, grads_logits = loss_and_grads(t, inputs)
    t.opd_options = dataclasses.replace(t.opd_options, fused_linear=True, fused_linear_chunk_size=5)
    try:
        loss_fused, grads_fused = loss_and_grads(t, inputs)
    finally:
        t.opd_options = dataclasses.replace(t.opd_options, fused_linear=False, fused_linear_chunk_size=None)

    torch.testing.assert_close(loss_fused, loss_logits, rtol=1e-5, atol=1e-7)
    assert grads_fused.keys() == grads_logits.keys()
    for name in grads_logits:
        torch.testing.assert_close(
            grads_fused[name], grads_logits[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )
    metrics = t._metrics["train"]
    for key in ("opd/reverse_kl", "opd/advantage", "opd/multiplier", "opd/topk_overlap"):
        assert len(metrics[key]) == 2 and metrics[key][0] == pytest.approx(metrics[key][1], rel=1e-5, abs=1e-7), key
    t._metrics["train"].clear()


def test_gradient_accumulation_invariance(tmp_path):
    """4 prompts per optimiser step as one micro-batch or as two: the same update (plain SGD, so the
    update is proportional to the gradient) and the same logged loss."""

    def one_step(accumulation: int):
        t = trainer(
            tmp_path / str(accumulation),
            max_steps=1,
            per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
        )
        rollouts = spy_rollouts(t)
        before = snapshot(t.model)
        t.train()
        delta = {name: p.detach() - before[name] for name, p in t.model.named_parameters()}
        return delta, step_logs(t)[0], rollouts

    whole, log_whole, rollouts_whole = one_step(1)
    split, log_split, rollouts_split = one_step(2)
    # Same rollouts (one generation per optimiser step), of different lengths: a per-micro-batch
    # token mean would weigh the two halves differently.
    assert torch.equal(rollouts_whole[0].sequences, rollouts_split[0].sequences)
    assert len(set(rollouts_whole[0].lengths.tolist())) > 1
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert log_split["loss"] == pytest.approx(log_whole["loss"], rel=1e-5)
    assert log_split["opd/tokens_saved"] == log_whole["opd/tokens_saved"]


@pytest.mark.parametrize("fused_linear", [False, True])
def test_lora_student(tmp_path, fused_linear):
    peft = pytest.importorskip("peft")
    t = trainer(
        tmp_path,
        student=tiny_lm(0, arch="qwen2"),
        teacher=tiny_lm(1, arch="qwen2"),
        max_steps=2,
        fused_linear=fused_linear,
        prune_chunk_size=3,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert isinstance(t.model, peft.PeftModel)
    rollouts = spy_rollouts(t)
    before = snapshot(t.model)
    t.train()
    after = snapshot(t.model)
    lora = [name for name in before if "lora_" in name]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(r.tokens_saved > 0 for r in rollouts)
    assert all(r.teacher_forwards < MAX_NEW for r in rollouts)  # chunked: one teacher call per 3 tokens
    assert all(math.isfinite(log["opd/reverse_kl"]) for log in step_logs(t))


def test_dynamic_window_follows_the_rollouts(tmp_path):
    prune = dataclasses.replace(
        PRUNE, window=6, window_min=2, window_step=2, window_margin=0, window_hit_ratio=0.5, window_shrink_patience=1
    )
    t = trainer(tmp_path, prune=prune, max_steps=2)
    rollouts = spy_rollouts(t)
    t.train()
    # Replayed from the rollouts: each batch is capped by the window its predecessors left.
    window, expected = opd_ext.DynamicWindow(prune), []
    for rollout in rollouts:
        assert int(rollout.lengths.max()) <= window.length
        expected.append(window.update(rollout.effective_lengths))
    assert [log["opd/window"] for log in step_logs(t)] == expected
    assert expected != [prune.window] * len(expected)


# ---- construction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(beta=0.5), ValueError, "beta"),
        (dict(baseline="mean"), ValueError, "baseline"),
        (dict(baseline_topk=0), ValueError, "baseline_topk"),
        (dict(prune_chunk_size=0), ValueError, "prune_chunk_size"),
    ],
)
def test_bad_options_are_rejected(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(min_p=0.1), "min_p"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(generation_kwargs={"no_repeat_ngram_size": 2}), "no_repeat_ngram_size"),
    ],
)
def test_sampling_the_loop_cannot_do_is_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, **overrides)
    trainer(tmp_path, prune=None, **overrides)  # TRL's generate() does them


def test_construction_errors(tmp_path):
    with pytest.raises(TypeError, match="PruneConfig"):
        trainer(tmp_path, prune={"k": 8})
    with pytest.raises(ValueError, match="teacher_model"):
        OPDTrainer(model=tiny_lm(0), args=config(tmp_path), train_dataset=prompts(), processing_class=tokenizer())
    with pytest.raises(ValueError, match="fused_linear"):
        softcapped = tiny_lm(1)
        softcapped.config.final_logit_softcapping = 30.0
        trainer(tmp_path, teacher=softcapped, fused_linear=True)
    # A sampling temperature other than the loss temperature is refused, naming both options.
    with pytest.raises(ValueError, match=r"generation_kwargs\['temperature'\]=0.7 differs from temperature=1.0"):
        trainer(tmp_path, generation_kwargs={"temperature": 0.7})
    trainer(tmp_path, generation_kwargs={"temperature": 1.0})
    # A transform under no known name (here: a subclass whose forward doubles the logits) is refused
    # by the probe; the same model without it passes.
    plain_lm = tiny_lm(1)
    with torch.no_grad():  # non-zero logits, so that doubling them shows
        plain_lm.lm_head.weight.normal_()

    class ScaledLogits(type(plain_lm)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    scaled = ScaledLogits(plain_lm.config)
    scaled.load_state_dict(plain_lm.state_dict())
    with pytest.raises(ValueError, match="other logits"):
        trainer(tmp_path, teacher=scaled, fused_linear=True)
    trainer(tmp_path, teacher=plain_lm, fused_linear=True)
    # A plain DistillationConfig works, with the OPD defaults.
    plain = trl.DistillationConfig(
        **{f.name: getattr(config(tmp_path), f.name) for f in dataclasses.fields(trl.DistillationConfig) if f.init}
    )
    t = OPDTrainer(
        model=tiny_lm(0), teacher_model=tiny_lm(1), args=plain, train_dataset=prompts(), processing_class=tokenizer()
    )
    assert t.opd_options.baseline == "full" and not t.opd_options.fused_linear


def test_trl_version_is_checked(tmp_path, monkeypatch):
    assert check_trl_version() == trl.__version__
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(RuntimeError, match=r"trl>=1\.16\.0,<1\.17\.0.*pip install"):
            check_trl_version(version)
    check_trl_version("1.16.3")
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="trl 1.17.0 is installed"):
        trainer(tmp_path)


def test_import_without_trl_names_pip_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "opd_ext.integrations.trl")
    monkeypatch.setitem(sys.modules, "trl", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match="pip install 'trl>=1.16.0,<1.17.0'"):
        importlib.import_module("opd_ext.integrations.trl")


def test_importing_opd_ext_does_not_import_trl():
    code = "import sys, opd_ext, opd_ext.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loss_value_and_scale_match_trls_reverse_kl(tmp_path):
    """Without Prune-OPD the logged loss is TRL's own beta=1 loss (the reverse KL, normalised by
    TRL's num_items_in_batch) on the same micro-batch: same quantity, same scale."""
    t = trainer(tmp_path, prune=None, temperature=0.8)
    inputs = one_batch(t)
    ours = t.compute_loss(t.model, inputs)
    num_items = inputs["num_items_in_batch"].clamp(min=1.0) / t.accelerator.num_processes
    theirs, _, _ = trl.DistillationTrainer._compute_loss(t, t.model, inputs, num_items)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-4, atol=1e-6)
