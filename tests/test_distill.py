"""Distillation: losses, students cut from the teacher, compatibility checks, cache, the stage end to end."""

import pytest
import torch

from compress import RecipeError, run
from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import load_data, pad_collate
from compress.distill import compat, losses
from compress.distill import student as st
from compress.distill.cache import build_cache
from compress.distill.objective import Objective, StudentWithProjections
from compress.recipe import DataSpec
from compress.stages.distill import Distill, run_distill
from compress.testing import make_tiny_bert, make_tiny_llama, make_tokenizer

FAST = {"lr": 1e-3, "max_steps": 4, "batch_size": 8}
QUIET = {"baseline": False, "speed": False}


# ------------------------------------------------------------------------------- losses


def test_topk_kl_with_the_whole_vocabulary_equals_the_dense_kl_in_both_directions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11) * 2
    for direction in ("forward", "reverse"):
        dense = losses.kl_dense(s, t, 2.0, direction)
        idx, logp = losses.topk_log_probs(t, 11, 2.0)
        assert torch.allclose(losses.kl_topk(s, idx, logp, 2.0, direction), dense, atol=1e-5)
        # A truncated teacher (its tail spread evenly) keeps the KL finite in both directions.
        idx, logp = losses.topk_log_probs(t * 4, 4, 2.0)
        assert torch.isfinite(losses.kl_topk(s, idx, logp, 2.0, direction))
    # Forward KL is dominated by the teacher's top tokens, so top-4 of 11 stays close for a peaked teacher.
    idx, logp = losses.topk_log_probs(t * 4, 4, 2.0)
    approx = losses.kl_topk(s, idx, logp, 2.0, "forward")
    assert abs(float(approx - losses.kl_dense(s, t * 4, 2.0, "forward"))) < 0.2
    assert float(losses.kl_dense(t, t, 3.0, "forward")) == pytest.approx(0.0, abs=1e-6)
    forward, reverse = losses.kl_dense(s, t, 1.0, "forward"), losses.kl_dense(s, t, 1.0, "reverse")
    assert float(forward) != pytest.approx(float(reverse))


def test_hidden_and_attention_losses_ignore_padded_positions():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    b2 = b.clone()
    b2[0, 2:] = 100.0  # changes only padded positions
    for kind in ("mse", "cosine"):
        same = losses.hidden_loss(a, b2, mask, kind)
        assert float(losses.hidden_loss(a, b, mask, kind)) == pytest.approx(float(same))
    assert float(losses.hidden_loss(a, a, mask, "cosine")) == pytest.approx(0.0, abs=1e-6)
    att = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    assert float(losses.attention_loss(att, att, mask)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------- students


def test_student_cut_from_the_teacher_copies_the_kept_layers_and_reloads(tmp_path):
    teacher = ModelBundle.load(make_tiny_llama(tmp_path / "t", num_hidden_layers=4)).model
    assert st.every_kth(6, 2) == [1, 3, 5] and st.every_kth(4, 3) == [2]
    student = st.student_from_layers(teacher, [0, 3], "causal-lm")
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # The KV-cache slots are renumbered with the layers.
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    student.save_pretrained(tmp_path / "s")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.tensor([[8, 9, 10, 11]])
    assert torch.equal(again(input_ids=ids).logits, student(input_ids=ids).logits)
    assert st.default_layer_map(2, 4, [0, 3]) == {1: 1, 2: 4}
    assert st.default_layer_map(3, 6, None) == {1: 2, 2: 4, 3: 6}


# ------------------------------------------------------------------------------- config and checks


def test_config_mistakes_are_reported_at_load_time():
    with pytest.raises(ValueError, match="teacher: the teacher is the incoming model, so the student must be"):
        Distill()
    with pytest.raises(ValueError, match="keep_layers: the student is already given by keep_every"):
        Distill(keep_every=2, keep_layers=[1])
    with pytest.raises(ValueError, match="teacher_cache: hidden-state and attention matching need"):
        Distill(keep_every=2, hidden_loss="mse", teacher_cache="disk")
    with pytest.raises(ValueError, match=r"keep_layers: \[3, 1\] must be distinct, ascending"):
        Distill(keep_layers=[3, 1])
    with pytest.raises(ValueError, match="layer_map: only hidden_loss and attention_weight use it"):
        Distill(keep_every=2, layer_map={1: 2})


def test_model_mistakes_are_all_reported_before_any_work(cls_recipe, tmp_path):
    two_labels = make_tiny_bert(tmp_path / "two", num_labels=2)
    llama = make_tiny_llama(tmp_path / "llama")
    cls_recipe["stages"] = [
        {"type": "distill", "keep_layers": [0, 5], **FAST},
        {"type": "distill", "student_model": str(two_labels), **FAST},
        {"type": "distill", "student_model": str(llama), **FAST},
        {"type": "distill", "teacher": "stage:7", **FAST},
        {"type": "distill", "student_config": {"hidden_size": 30}, **FAST},
        {"type": "distill", "student_config": {"num_hidden_layers": 1, "num_attention_heads": 2},
         "attention_weight": 1.0, **FAST},
    ]
    with pytest.raises(RecipeError) as err:
        run(cls_recipe)
    problems = err.value.problems
    assert "stages[0].keep_layers: [5] do not exist; the teacher has layers 0..1" in problems
    assert ("stages[1].teacher: the teacher predicts 3 labels but the student 2; give a student with the "
            "teacher's 3 labels") in problems
    assert ("stages[2].teacher: the teacher is a sequence-classification model but the student is causal-lm; "
            "distil between models of the same task") in problems
    assert ("stages[3].teacher: 'stage:7' is not an earlier stage of this run (earlier stages: 1 (distill), "
            "2 (distill), 3 (distill)); name one by number or name") in problems
    assert any(p.startswith("stages[4].student_config: these settings do not make a valid model")
               for p in problems)
    assert ("stages[5].attention_weight: attention transfer compares maps head by head, but the teacher has "
            "4 heads and the student 2; use equal head counts or set attention_weight: 0") in problems
    assert not (tmp_path / "run").exists()  # nothing was written


def test_vocabulary_mismatch_names_the_ids_and_padding_rows_are_fine(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(make_tiny_llama(tmp_path / "a"))
    tok, other = make_tokenizer("llama"), make_tokenizer("llama")
    other.add_tokens(["zebra"])
    n = len(tok)
    assert compat.vocabulary_problems(cfg, tok, cfg, tok) == []
    padded = AutoConfig.from_pretrained(tmp_path / "a")
    padded.vocab_size = n + 11  # embedding rows beyond the tokenizer (padding) are harmless
    assert compat.vocabulary_problems(cfg, tok, padded, make_tokenizer("llama")) == []
    problems = compat.vocabulary_problems(cfg, tok, cfg, other)
    assert problems[0] == (f"teacher: the teacher and student vocabularies differ ({n} vs {n + 1} tokens, "
                           f"1 ids differ: id {n} is None for the teacher and 'zebra' for the student); "
                           f"distillation needs both models to share one tokenizer")
    short = AutoConfig.from_pretrained(tmp_path / "a")
    short.vocab_size = n - 3
    assert compat.vocabulary_problems(short, tok, cfg, tok) == [
        f"teacher: the teacher has {n - 3} embedding rows but the tokenizer has {n} tokens, so ids from "
        f"{n - 3} up have no embedding; resize its embeddings"]


# ------------------------------------------------------------------------------- cache and objective


def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(tiny_bert_dir, sentiment_csv, tmp_path):
    data = load_data(DataSpec(source=str(sentiment_csv), label_column="label", max_length=32, eval_size=0.2),
                     "sequence-classification")
    teacher = ModelBundle.load(tiny_bert_dir)
    student = st.student_from_layers(teacher.model, [1], "sequence-classification")
    ds = data.tokenized("train", teacher.tokenizer).select(range(16))
    ds = ds.add_column("example_index", list(range(16)))
    base = pad_collate(teacher.tokenizer)

    def collate(rows):
        return {**base(rows), "example_index": torch.tensor([r["example_index"] for r in rows])}

    cache = build_cache(teacher.model, ds, collate, k=64, temperature=2.0, vocab=3, device="cpu",
                        folder=tmp_path / "c", key="k1", batch_size=5)
    assert cache.indices.shape == (16, 3) and cache.path.exists()
    # Read back from disk: the teacher is not needed.
    again = build_cache(None, ds, collate, k=64, temperature=2.0, vocab=3, device="cpu",
                        folder=tmp_path / "c", key="k1")
    assert torch.equal(again.logp, cache.logp)
    wrapper = StudentWithProjections(student, {}, 64, 64, with_projections=False).eval()  # no dropout
    common = dict(teacher=teacher.model, task="sequence-classification", vocab=3, alpha=0.3, temperature=2.0,
                  direction="forward", hidden_kind="none", hidden_weight=0.0, attention_weight=0.0,
                  layer_map={})
    batch = collate([ds[i] for i in (3, 7, 11)])
    with torch.no_grad():
        live = Objective(**common)(wrapper, batch)
        cached = Objective(**common, cache=cache)(wrapper, batch)
    assert float(cached) == pytest.approx(float(live), rel=1e-5)


# ------------------------------------------------------------------------------- the stage


def test_classifier_distils_into_half_its_layers_and_reports(cls_recipe, tmp_path):
    teacher = make_tiny_bert(tmp_path / "t4", num_hidden_layers=4)
    cls_recipe["model"]["path"] = str(teacher)
    cls_recipe["eval"].update(QUIET)
    cls_recipe["stages"] = [{"type": "distill", "keep_every": 2, "hidden_loss": "mse",
                             "attention_weight": 0.5, **FAST}]
    report = run(cls_recipe)
    info = report.points[-1].stage_info
    assert info["teacher_layers"] == 4 and info["student_layers"] == 2
    assert info["student_parameters"] < info["teacher_parameters"]
    assert info["layer_map"] == {"1": 2, "2": 4} and info["projections"] == 0
    assert {"mean_ce_loss", "mean_kl_loss", "mean_hidden_loss", "mean_attention_loss"} <= set(info)
    assert len(info["loss_curve"]) == 4 and 0 <= info["agreement_with_teacher"] <= 1
    kept = info["student_accuracy"] / info["teacher_accuracy"]
    assert info["accuracy_kept"] == pytest.approx(kept, abs=1e-3)
    saved = ModelBundle.load(tmp_path / "run" / "01-distill")
    assert saved.model.config.num_hidden_layers == 2
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "01-distill")
    ids = torch.tensor([[2, 10, 12, 3]])
    assert torch.equal(plain(input_ids=ids).logits, saved.model(input_ids=ids).logits)


def test_smaller_hidden_size_gets_learned_projections_and_reverse_kl(lm_recipe):
    lm_recipe["eval"].update(QUIET)
    lm_recipe["stages"] = [{"type": "distill", "student_config": {"num_hidden_layers": 1, "hidden_size": 32,
                                                                  "intermediate_size": 64, "head_dim": 8},
                            "hidden_loss": "cosine", "kl_direction": "reverse", **FAST}]
    info = run(lm_recipe).points[-1].stage_info
    assert info["student_layers"] == 1 and info["projections"] == 1 and info["layer_map"] == {"1": 2}
    assert info["kl_direction"] == "reverse" and info["mean_hidden_loss"] > 0
    assert info["teacher_perplexity"] > 1 and info["student_perplexity"] > 1


def test_pruned_incoming_model_recovers_from_a_named_teacher_and_stays_sparse(tiny_llama_dir, lm_text,
                                                                              tmp_path):
    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2, label_column=None),
                     "causal-lm")
    bundle = ModelBundle.load(tiny_llama_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    weight = dict(bundle.model.named_parameters())[name]
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        weight.mul_(mask)
    bundle.masks = {name: mask}
    before = weight.detach().clone()
    config = Distill(teacher=str(tiny_llama_dir), alpha=0.0, teacher_cache="disk", cache_top_k=8, **FAST)
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work",
                     show_progress=False)
    out = run_distill(bundle, config, ctx)
    after = dict(out.bundle.model.named_parameters())[name]
    assert out.bundle.masks.keys() == {name} and bool((after[~mask] == 0).all())
    assert not torch.equal(after[mask], before[mask])  # the kept weights did train
    assert list((tmp_path / "work" / "teacher-cache").glob("teacher-top8-*.safetensors"))
    assert out.facts["student"] == "incoming model"
    assert out.facts["steps"] == 4


def test_teacher_can_be_an_earlier_stage_output(lm_recipe):
    lm_recipe["eval"].update(QUIET)
    lm_recipe["stages"] = [
        {"type": "finetune", "method": "full", "name": "teach", **FAST},
        {"type": "distill", "teacher": "stage:teach", "keep_layers": [1], "alpha": 0.0, **FAST},
    ]
    info = run(lm_recipe).points[-1].stage_info
    assert info["teacher"] == "stage:teach (01-finetune)" and info["student_layers"] == 1


@pytest.mark.slow
def test_distillation_beats_hard_labels_for_a_shallow_llama_student(lm_recipe, tmp_path):
    """A trained 4-layer tiny Llama teaches a fresh 1-layer student better than the labels alone do.

    (A student cut from the teacher already sits at this grammar's entropy floor after a few steps
    either way, so the comparison uses a randomly initialised one, where the soft targets matter.)
    """
    teacher = make_tiny_llama(tmp_path / "t4", num_hidden_layers=4)
    lm_recipe["model"]["path"] = str(teacher)
    lm_recipe["eval"].update(QUIET)
    lm_recipe["stages"] = [{"type": "finetune", "method": "full", "lr": 3e-3, "max_steps": 150,
                            "batch_size": 16}]
    run(lm_recipe)
    ppl = {}
    for alpha in (0.0, 1.0):
        recipe = {**lm_recipe, "output_dir": str(tmp_path / f"a{alpha}"),
                  "model": {"path": str(tmp_path / "run" / "01-finetune"), "task": "causal-lm"},
                  "stages": [{"type": "distill", "student_config": {"num_hidden_layers": 1}, "alpha": alpha,
                              "temperature": 1.0, "lr": 3e-3, "max_steps": 15, "batch_size": 16}]}
        ppl[alpha] = run(recipe).points[-1].stage_info["student_perplexity"]
    assert ppl[0.0] < ppl[1.0]


_WORKER = '''
import hashlib, json, os, sys
from pathlib import Path
from compress.bundle import ModelBundle
from compress.context import RunContext
from compress.data import load_data
from compress.recipe import DataSpec
from compress.stages.distill import Distill, run_distill

model_dir, csv, out = sys.argv[1:4]
data = load_data(DataSpec(source=csv, label_column="label", max_length=32, eval_size=0.2),
                 "sequence-classification", seed=0)
ctx = RunContext(output_dir=Path(out), seed=0, device="cpu", data=data, work_dir=Path(out) / "work",
                 show_progress=False)
res = run_distill(ModelBundle.load(model_dir), Distill(keep_layers=[1], teacher_cache="disk", lr=1e-3,
                                                       max_steps=4, batch_size=8), ctx)
digest = hashlib.sha256()
for name, p in sorted(res.bundle.model.state_dict().items()):
    digest.update(name.encode() + p.detach().numpy().tobytes())
info = res.facts
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(
    {"weights": digest.hexdigest(), "processes": info["num_processes"], "curve": info["loss_curve"]}))
'''


@pytest.mark.slow
def test_distillation_runs_on_two_processes_with_one_shared_teacher_cache(tiny_bert_dir, sentiment_csv,
                                                                          tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(worker), str(tiny_bert_dir), str(sentiment_csv), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["curve"] == ranks[1]["curve"]
    assert len(list((tmp_path / "work" / "teacher-cache").glob("*.safetensors"))) == 1


def test_layers_unlike_the_others_are_refused_with_the_reason(tmp_path):
    """ModernBERT builds layer 0 without an attention norm: keep_every: 2 would move layer 1 (which has
    one) into that place. The check says so before any work; keeping layer 0 works and reloads."""
    from compress.stages.distill import check_distill
    from compress.testing import make_tiny_model

    bundle = ModelBundle.load(make_tiny_model("modernbert", tmp_path / "modernbert"))
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", show_progress=False)
    problems = check_distill(bundle, Distill(keep_every=2), ctx)
    assert any(p.startswith("keep_every: ModernBertForSequenceClassification's layers are not all alike")
               and "model.layers.0.attn_norm.weight" in p for p in problems), problems
    with pytest.raises(ValueError, match="layers are not all alike"):
        st.student_from_layers(bundle.model, [1], bundle.task)
    student = st.student_from_layers(bundle.model, [0], bundle.task)
    assert st.layers_mismatch(bundle.model, [0], bundle.task) is None
    assert student.config.num_hidden_layers == 1


def test_distillation_stops_at_the_stop_flag_and_resumes_where_it_stopped(tiny_llama_dir, lm_text, tmp_path):
    """The runner's stop flag (Ctrl-C / SIGTERM) reaches distillation's training loop, as it does
    fine-tuning's: it stops at a step boundary with a checkpoint, and a resume continues from it."""
    from compress.errors import Interrupted

    data = load_data(DataSpec(source=str(lm_text), max_length=32, eval_size=0.2, label_column=None),
                     "causal-lm")
    config = Distill(teacher=str(tiny_llama_dir), keep_layers=[1], **FAST)
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work",
                     show_progress=False)
    ctx.stop.set()
    with pytest.raises(Interrupted):
        run_distill(ModelBundle.load(tiny_llama_dir), config, ctx)
    assert (tmp_path / "work" / "checkpoint").is_dir()
    resumed = RunContext(output_dir=tmp_path, seed=0, device="cpu", data=data, work_dir=tmp_path / "work",
                         show_progress=False, resume=True)
    out = run_distill(ModelBundle.load(tiny_llama_dir), config, resumed)
    assert out.facts["steps"] == 4 and out.facts["resumed_from_step"] is not None


def test_sharding_a_4bit_teacher_is_refused_before_any_work(tiny_llama_dir, tmp_path):
    """The check finetune makes, here too: DeepSpeed cannot shard bitsandbytes' packed 4-bit weights."""
    import bitsandbytes as bnb

    from compress.stages.distill import check_distill

    bundle = ModelBundle.load(tiny_llama_dir)
    ctx = RunContext(output_dir=tmp_path, seed=0, device="cuda", show_progress=False)
    config = Distill(keep_every=2, deepspeed={"zero_optimization": {"stage": 2}})
    assert not any("4-bit" in p for p in check_distill(bundle, config, ctx))
    layer = bundle.model.model.layers[0].mlp.up_proj
    bundle.model.model.layers[0].mlp.up_proj = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False,
                                                                 quant_type="nf4")
    problems = check_distill(bundle, config, ctx)
    assert any(p.startswith("deepspeed: DeepSpeed (from this stage) cannot shard a 4-bit (bitsandbytes) base")
               for p in problems), problems
