"""The shared training loop: checkpoints, exact resume, NaN handling, optimizers, early stopping, masks."""

import datasets
import pytest
import torch

from compress.data import pad_collate
from compress.errors import StageError
from compress.testing import make_tokenizer, sentiment_rows
from compress.training import TrainingFields, train
from compress.training.checkpoint import flatten, load_checkpoint, unflatten

LABELS = {"negative": 0, "neutral": 1, "positive": 2}


@pytest.fixture(scope="module")
def data():
    tok = make_tokenizer("bert")
    rows = sentiment_rows(96, seed=1)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=16)
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                     "labels": [LABELS[r["label"]] for r in rows]})
    return ds, pad_collate(tok)


def _model(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)  # dropout 0.1: RNG matters


def _settings(**kw):
    return TrainingFields(**{"lr": 1e-3, "batch_size": 8, "warmup_ratio": 0.1, **kw})


def test_flatten_round_trip_keeps_structure_and_tensors():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2),
                           "nested": {"absmax": torch.arange(4)}}},
             "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.999)}]}
    tensors = {}
    blob = flatten(state, "opt", tensors)
    back = unflatten(blob, tensors)
    assert list(back["state"]) == [0]  # int keys survive
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["state"][0]["nested"]["absmax"], torch.arange(4))
    assert len(tensors) == 3


def test_resume_after_kill_matches_uninterrupted_run(tiny_bert_dir, data, tmp_path):
    ds, collate = data
    settings = _settings(max_steps=8, checkpoint_every=3, grad_accum=2, batch_size=4)
    ref = _model(tiny_bert_dir)
    full = train(ref, ds, collate, settings, device="cpu", seed=3, show_progress=False)

    calls = {"n": 0}

    def dies_after_seven_batches(model, batch):
        calls["n"] += 1
        if calls["n"] > 7:  # step 3 (6 micro-batches) is checkpointed, then the process "dies"
            raise KeyboardInterrupt
        return model(**batch).loss

    with pytest.raises(KeyboardInterrupt):
        train(_model(tiny_bert_dir), ds, collate, settings, device="cpu", seed=3, show_progress=False,
              loss_fn=dies_after_seven_batches, checkpoint_dir=tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt")[2]["steps"] == 3
    torch.manual_seed(12345)  # a fresh process would have a different RNG state
    resumed_model = _model(tiny_bert_dir)
    resumed = train(resumed_model, ds, collate, settings, device="cpu", seed=3, show_progress=False,
                    checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.resumed_from_step == 3 and resumed.steps == 8
    assert resumed.loss_curve == full.loss_curve
    for (name, a), (_, b) in zip(ref.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_refuses_a_checkpoint_with_another_batch_layout(tiny_bert_dir, data, tmp_path):
    ds, collate = data
    train(_model(tiny_bert_dir), ds, collate, _settings(max_steps=4, checkpoint_every=2), device="cpu", seed=0,
          show_progress=False, checkpoint_dir=tmp_path / "c")
    with pytest.raises(StageError, match="cannot resume from .* restore those settings"):
        train(_model(tiny_bert_dir), ds, collate, _settings(max_steps=4, checkpoint_every=2, batch_size=4),
              device="cpu", seed=0, show_progress=False, checkpoint_dir=tmp_path / "c", resume=True)


def test_nan_loss_stops_keeps_last_good_state_and_says_so(tiny_bert_dir, data, tmp_path):
    ds, collate = data
    calls = {"n": 0}

    def nan_at_third_step(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if calls["n"] == 3 else loss

    model = _model(tiny_bert_dir)
    with pytest.raises(StageError) as err:
        train(model, ds, collate, _settings(max_steps=5), device="cpu", seed=0, show_progress=False,
              loss_fn=nan_at_third_step, checkpoint_dir=tmp_path / "ckpt")
    msg = str(err.value)
    assert "the loss became nan at step 3" in msg
    assert "last good state (step 2) is saved" in msg and "mixed_precision: no (fp32)" in msg and "bf16" in msg
    weights, _, state = load_checkpoint(tmp_path / "ckpt")
    assert state["steps"] == 2
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_eight_bit_optimizer_trains_and_its_state_checkpoints(tiny_bert_dir, data, tmp_path):
    ds, collate = data
    result = train(_model(tiny_bert_dir), ds, collate, _settings(max_steps=4, optimizer="adamw_8bit",
                                                                 checkpoint_every=2),
                   device="cpu", seed=0, show_progress=False, checkpoint_dir=tmp_path / "c")
    assert result.steps == 4
    _, opt_state, _ = load_checkpoint(tmp_path / "c")
    assert any("__bnb_optimizer_quant_state__" in s for s in opt_state["state"].values())


def test_epochs_accumulation_and_early_stopping(tiny_bert_dir, data):
    ds, collate = data
    # 96 rows / batch 8 = 12 batches; grad_accum 4 -> 3 steps per epoch; 2 epochs -> 6 steps.
    result = train(_model(tiny_bert_dir), ds, collate, _settings(epochs=2, grad_accum=4), device="cpu", seed=0,
                   show_progress=False)
    assert result.steps == 6 and [s for s, _ in result.loss_curve] == [1, 2, 3, 4, 5, 6]
    assert result.samples == 192 and result.peak_rss_bytes > 0
    stopped = train(_model(tiny_bert_dir), ds, collate,
                    _settings(max_steps=50, eval_every=2, early_stopping_patience=2), device="cpu", seed=0,
                    show_progress=False, evaluate=lambda m: {"accuracy": 0.5}, eval_metric="accuracy")
    # first eval sets the best, two more without improvement stop it: evals at steps 2, 4, 6.
    assert stopped.stopped_early and stopped.steps == 6 and len(stopped.eval_curve) == 3


def test_masks_are_reapplied_after_every_step(tiny_bert_dir, data):
    ds, collate = data
    model = _model(tiny_bert_dir)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    mask = torch.rand_like(dict(model.named_parameters())[name]) > 0.5
    train(model, ds, collate, _settings(max_steps=3, lr=1e-2), device="cpu", seed=0, show_progress=False,
          masks={name: mask})
    weight = dict(model.named_parameters())[name]
    assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()


def test_training_fields_reject_bad_values():
    with pytest.raises(ValueError, match="greater than 0"):
        TrainingFields(lr=0)
    with pytest.raises(ValueError, match="early_stopping_patience needs eval_every"):
        TrainingFields(early_stopping_patience=2)


def test_the_stage_entry_takes_seed_checkpoint_folder_and_stop_flag_from_the_context(tiny_bert_dir, data, tmp_path):
    """Stages train through `train_in_stage`: the context's seed gives the same run as the loop called with
    it, the checkpoint lands in the stage's work folder, and the context's stop flag interrupts."""
    from compress.context import RunContext
    from compress.errors import Interrupted
    from compress.stages.finetune import Finetune
    from compress.training.entry import eval_metric_for, train_in_stage

    ds, collate = data
    config = Finetune(method="full", lr=1e-3, batch_size=8, warmup_ratio=0.1, max_steps=4, checkpoint_every=2)
    ctx = RunContext(output_dir=tmp_path, seed=5, device="cpu", stage_name="01-finetune", show_progress=False)
    via_ctx = train_in_stage(_model(tiny_bert_dir), ds, collate, config, ctx, task="sequence-classification")
    direct = train(_model(tiny_bert_dir), ds, collate, config, device="cpu", seed=5, show_progress=False)
    assert via_ctx.loss_curve == direct.loss_curve
    assert load_checkpoint(tmp_path / ".work-01-finetune" / "checkpoint")[2]["steps"] >= 2
    assert eval_metric_for("sequence-classification") == "accuracy" and eval_metric_for("causal-lm") == "eval_loss"

    stopped = RunContext(output_dir=tmp_path / "b", seed=5, device="cpu", stage_name="01-finetune",
                         show_progress=False)
    stopped.stop.set()
    with pytest.raises(Interrupted):
        train_in_stage(_model(tiny_bert_dir), ds, collate, config, stopped, task="sequence-classification")
    assert (tmp_path / "b" / ".work-01-finetune" / "checkpoint").is_dir()
