"""A one-page summary of a run, finished or still going: OUTPUT_DIR/report.md and its plots.

    python report.py OUTPUT_DIR     (train.py writes it at the end of every run)

It reads only what a run leaves on disk: metrics.jsonl (appended as the run goes), results.json
(written at the end) and the run's flags (in results.json, else in the newest checkpoint's
trainer_state.json), so it works on a finished run, a running one and one that was stopped.
"""

import json
import os
import re
import time
from dataclasses import dataclass

from utils.checkpoint import STATE_FILE, complete_checkpoints
from utils.errors import UserError
from utils.files import publish, temporary_name, write_atomic
from utils.mesh import layout
from utils.metrics import perplexity, read_jsonl
from utils.profiling import profile_dir

PLOTS_DIR = "plots"


@dataclass
class Run:
    output_dir: str
    metrics: list  # the records of metrics.jsonl, in order
    results: dict | None  # results.json; None until the run has finished
    checkpoint_state: dict | None  # trainer_state.json of the newest complete checkpoint
    config: dict | None  # the run's flags

    @property
    def finished(self):
        return self.results is not None

    @property
    def train_records(self):
        return [r for r in self.metrics if "loss" in r]

    @property
    def eval_records(self):
        return [r for r in self.metrics if "eval_loss" in r]

    @property
    def events(self):
        """Loss spikes' skipped updates and rollbacks (utils/spikes.py), in order."""
        return [r for r in self.metrics if "event" in r]

    @property
    def name(self):
        return (self.config or {}).get("run_name") or os.path.basename(os.path.abspath(self.output_dir))


def load_run(output_dir):
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} is not a directory: pass the --output_dir of a run")
    metrics = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    results = _read_json(os.path.join(output_dir, "results.json"))
    if not metrics and results is None:
        raise UserError(f"{output_dir} has no metrics.jsonl or results.json yet: "
                        "wait for the run's first evaluation, or check the path")
    checkpoints = complete_checkpoints(output_dir)
    state = _read_json(os.path.join(checkpoints[-1], STATE_FILE)) if checkpoints else None
    config = (results or {}).get("config") or (state or {}).get("config")
    return Run(output_dir, metrics, results, state, config)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- Numbers ---------------------------------------------------------------------------------

def headline(run):
    """The numbers a person looks at first, from results.json when finished, else from the metrics."""
    res, evals, train = run.results or {}, run.eval_records, run.train_records
    initial = res.get("initial_eval_loss", evals[0]["eval_loss"] if evals else None)
    final = res.get("eval_loss", evals[-1]["eval_loss"] if len(evals) > 1 else None)
    speeds = sorted(r["tokens_per_second"] for r in train if "tokens_per_second" in r)
    mfus = sorted(r["mfu"] for r in train if r.get("mfu") is not None)
    memory = [r["peak_memory_gib"] for r in train if "peak_memory_gib" in r]
    last_step = max((r["step"] for r in run.metrics), default=0)
    tokens_per_step = _tokens_per_step(run)
    return dict(
        initial_eval_loss=initial, eval_loss=final,
        eval_step=evals[-1]["step"] if final is not None and evals else None,
        train_loss=train[-1]["loss"] if train else None, train_loss_step=train[-1]["step"] if train else None,
        steps=res.get("steps", last_step),
        train_tokens=res.get("train_tokens", tokens_per_step and last_step * tokens_per_step),
        # while running: the median window, which neither the first (warm-up) nor a slow one skews
        tokens_per_second=res.get("tokens_per_second", speeds[len(speeds) // 2] if speeds else None),
        train_seconds=res.get("train_seconds"), mfu=res.get("mfu", mfus[len(mfus) // 2] if mfus else None),
        peak_memory_gib=max(memory) if memory else None,
        nonfinite_steps=res.get("nonfinite_steps", train[-1].get("nonfinite_steps") if train else None),
        parameters=res.get("parameters"))


def _tokens_per_step(run):
    """Known before results.json once a checkpoint has recorded the sequences per optimizer step."""
    if run.checkpoint_state and run.config:
        return run.checkpoint_state["samples_per_step"] * run.config["block_size"]
    return None


def batch_math(run):
    """'micro-batch x accumulation x processes = sequences x tokens = tokens per optimizer step'."""
    res, config = run.results, run.config or {}
    block = config.get("block_size")
    if res:
        sequences = res["global_batch_size"]
        ranks = sequences // (res["micro_batch_size"] * res["gradient_accumulation_steps"])  # data-parallel ones
        ranks = f"{ranks} process{'es' if ranks > 1 else ''}" if ranks == res["num_processes"] else \
            f"{ranks} data-parallel rank{'s' if ranks > 1 else ''}"
        return (f"{res['micro_batch_size']} micro-batch x {res['gradient_accumulation_steps']} accumulation x "
                f"{ranks} = {sequences} sequences"
                + (f" x {block} tokens = {sequences * block:,} tokens per optimizer step" if block else " per optimizer step"))
    if run.checkpoint_state and block:
        sequences = run.checkpoint_state["samples_per_step"]
        return (f"{sequences} sequences x {block} tokens = {sequences * block:,} tokens per optimizer step "
                f"(micro-batch {config.get('per_device_train_batch_size')} per process)")
    if block:
        return (f"micro-batch {config.get('per_device_train_batch_size')} x accumulation "
                f"{config.get('gradient_accumulation_steps')} per process, {block} tokens per sequence "
                "(processes: in results.json at the end)")
    return "unknown until the first checkpoint or the end of the run"


def status_line(run):
    if run.finished:
        res = run.results
        return f"finished: {res['steps']} steps in {_duration(res['train_seconds'])} of training"
    planned = (run.config or {}).get("max_train_steps")
    last_step = max((r["step"] for r in run.metrics), default=0)
    age = time.time() - os.path.getmtime(os.path.join(run.output_dir, "metrics.jsonl"))
    checkpoint = f", last checkpoint at step {run.checkpoint_state['step']}" if run.checkpoint_state else ""
    return (f"running or stopped (no results.json yet): step {last_step}{f' of {planned}' if planned else ''} "
            f"logged {_duration(age)} ago{checkpoint}")


def metrics_table(run):
    """Markdown rows of the final (or latest) metrics; the model card shows the same table."""
    h = headline(run)
    rows = []
    if h["initial_eval_loss"] is not None:
        initial, final = h["initial_eval_loss"], h["eval_loss"]
        if final is None:
            rows += [("eval loss (step 0)", f"{initial:.4f}"), ("eval perplexity (step 0)", f"{perplexity(initial):.1f}")]
        else:
            when = "" if run.finished else f" (step {h['eval_step']})"
            rows += [("eval loss" + when, f"{initial:.4f} → {final:.4f}"),
                     ("eval perplexity" + when, f"{perplexity(initial):.1f} → {perplexity(final):.1f} "
                                                f"({perplexity(initial - final):.1f}x lower)")]
    if h["train_loss"] is not None:
        rows.append(("last training loss", f"{h['train_loss']:.4f} (step {h['train_loss_step']})"))
    rows.append(("optimizer steps", f"{h['steps']:,}"))
    if h["train_tokens"]:
        rows.append(("tokens trained", f"{h['train_tokens']:,}"))
    if h["tokens_per_second"]:
        rows.append(("throughput", f"{h['tokens_per_second']:,.0f} tokens/s"))
    if h["train_seconds"] is not None:
        rows.append(("training time", _duration(h["train_seconds"])))
    if h["mfu"] is not None:
        rows.append(("MFU", f"{100 * h['mfu']:.1f}%"))
    if h["peak_memory_gib"] is not None:
        rows.append(("peak memory (main process)", f"{h['peak_memory_gib']:.2f} GiB"))
    if h["parameters"]:
        rows.append(("parameters", millions(h["parameters"])))
    if h["nonfinite_steps"]:
        rows.append(("non-finite steps (skipped)", str(h["nonfinite_steps"])))
    counts = {kind: sum(e["event"] == kind for e in run.events) for kind in ("skipped", "applied", "rollback")}
    if any(counts.values()):
        applied = f", {counts['applied']} applied (DeepSpeed)" if counts["applied"] else ""
        rows.append(("loss spikes", f"{counts['skipped']} update(s) skipped{applied}, {counts['rollback']} rollback(s)"))
    return _table(("metric", "value"), rows)


def config_table(run):
    """The flags that decide what a run is, not all fifty of them."""
    c, res = run.config, run.results or {}
    if not c:
        return "(no run config yet: it is saved with the first checkpoint and at the end)"
    rows = [("model", describe_model(c)), ("data", describe_data(c)), ("sequence length", f"{c['block_size']} tokens"),
            ("optimizer", f"AdamW, lr {c['learning_rate']:g}, betas ({c['adam_beta1']:g}, {c['adam_beta2']:g}), "
                          f"weight decay {c['weight_decay']:g}, clipping {c['max_grad_norm'] or 'off'}"),
            ("schedule", f"{c['lr_scheduler_type']}, {c['num_warmup_steps']} warmup steps"
                         + (f", down to {c['min_lr_ratio']:g} x lr" if c["lr_scheduler_type"] == "cosine" else "")),
            ("length", f"{c['max_train_steps']} steps" if c.get("max_train_steps") else f"{c['num_train_epochs']} epochs"),
            ("seed", str(c["seed"]))]
    if res:
        zero = f" ZeRO-{res['zero_stage']}" if res.get("zero_stage") is not None else ""
        processes = f"{res['num_processes']} process{'es' if res['num_processes'] > 1 else ''}"
        mesh = f" on the mesh {layout(res['mesh'])}" if res.get("mesh") else ""  # a parallelism_config's
        rows.append(("ran on", f"{processes}, distributed type {res['distributed_type']}{zero}{mesh}, "
                               f"mixed precision {res['mixed_precision']}"))
    return _table(("setting", "value"), rows)


def describe_model(config):
    if config.get("model_name_or_path"):
        return f"{config['model_name_or_path']} (pretrained, training continued)"
    if config.get("config_name"):
        return f"{config['config_name']} architecture, random init"
    preset = config.get("model_preset") or ""
    return f"{'GPT-2' if preset.startswith('gpt2') else 'Llama-style'} preset '{preset}', random init"


def describe_data(config):
    sources = config.get("sources") or []
    if config.get("data_dir"):
        return f"token store {config['data_dir']}"
    if len(sources) > 1:
        return sources_text(sources)
    if config.get("dataset_name"):
        return " / ".join(filter(None, (config["dataset_name"], config.get("dataset_config_name"))))
    if sources and sources[0].get("kind") == "files":
        return sources[0]["label"]
    return "embedded corpus (Python's documentation)"


def weight_text(weight):
    """A source's weight as given, or 'its size' when none was (the mixture is then the concatenation)."""
    return "its size" if weight is None else f"{weight:g}"


def sources_text(sources):
    """'a (weight 3), b (weight 1)' for sources with a label and a weight (run config or loaded blocks)."""
    return ", ".join(f"{s['label']} (weight {weight_text(s['weight'])})" for s in sources)


def sources_table(run):
    """Per source of a mixture: weight, train tokens drawn (share), final eval loss."""
    sources = (run.results or {}).get("sources") or []
    if len(sources) < 2:
        return None
    lines = ["| source | weight | train tokens (share) | eval loss |", "|---|---|---|---|"]
    for s in sources:
        loss = f"{s['eval_loss']:.4f}" if s.get("eval_loss") is not None else "-"
        lines.append(f"| {s['source']} | {weight_text(s['weight'])} | "
                     f"{millions(s['train_tokens'])} ({s['share']:.1%}) | {loss} |")
    return "\n".join(lines)


def cleaning_table(run):
    """A token store's cleaning (prepare_data.py --clean): per source, split and step, what was removed."""
    sources = [s for s in (run.results or {}).get("sources") or [] if s.get("cleaning")]
    if not sources:
        return None
    lines = ["| source | split | step | documents removed | tokens removed | why (datatrove's reasons) |",
             "|---|---|---|---|---|---|"]
    for s in sources:
        for split, steps in s["cleaning"].items():
            for step, removed in steps.items():
                if isinstance(removed, dict):
                    share = removed["documents"] / max(steps["documents"], 1)
                    why = ", ".join(f"{reason} {n:,}" for reason, n in sorted(removed["reasons"].items(),
                                                                              key=lambda item: -item[1])[:3])
                    tokens = f"{removed['tokens']:,}" if "tokens" in removed else "-"
                    lines.append(f"| {s['source']} | {split} | {step} | {removed['documents']:,} ({share:.1%}) | "
                                 f"{tokens} | {why or '-'} |")
            lines.append(f"| {s['source']} | {split} | kept | {steps['kept']:,} of {steps['documents']:,} | | |")
    return "\n".join(lines)


def events_table(run):
    """One row per loss-spike event: a skipped (or, under DeepSpeed, applied) outlier, a rollback."""
    if not run.events:
        return None
    lines = ["| step | event | detail |", "|---|---|---|"]
    for e in run.events:
        if e["event"] == "not_rolled_back":
            detail = "a sustained spike and no checkpoint from before it: its updates were skipped"
        elif e["event"] == "rollback":
            first, last = e["data_steps_skipped"]
            blocks = f" ({sum(e['skipped_blocks']):,} blocks)" if e.get("skipped_blocks") else ""
            detail = (f"at step {e['at_step']} (outliers at steps {', '.join(map(str, e['outliers']))}) back to "
                      f"{e['checkpoint']}; the data of steps {first}-{last} skipped{blocks}")
        else:
            norm = "" if e.get("step_grad_norm") is None else \
                f", grad norm {e['step_grad_norm']:.3g} ({e['grad_norm_z']:.1f} sigma)"
            data = f"; the data of step {e['data_step']}" if "data_step" in e else ""
            detail = f"loss {e['step_loss']:.4f} ({e['loss_z']:.1f} sigma){norm}{data}"
        lines.append(f"| {e['step']} | {e['event']} | {detail} |")
    return "\n".join(lines)


def profile_table(run):
    """The time of a step profiled with --profile_steps, by part (the lowest profiled rank's)."""
    directory = profile_dir(run.output_dir)
    files = sorted((int(name[len("breakdown_rank"):-len(".json")]), name) for name in
                   (os.listdir(directory) if os.path.isdir(directory) else []) if re.fullmatch(r"breakdown_rank\d+\.json", name))
    profile = _read_json(os.path.join(directory, files[0][1])) if files else None
    if not profile or not profile.get("step_seconds"):
        return None
    step = profile["step_seconds"]
    first, last = profile["steps"]
    lines = [f"Steps {first}-{last} on rank {files[0][0]}, {1000 * step:.1f} ms per step on average; trace: "
             f"`profile/{profile['trace']}` (ui.perfetto.dev or TensorBoard).", "",
             "| part | ms per step | share |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * seconds:.2f} | {seconds / step:.0%} |" for name, seconds in profile["parts"].items()]
    return "\n".join(lines)


def _table(header, rows):
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def millions(count):
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.{1 if count >= 1e7 else 2}f}M"


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# --- Plots -----------------------------------------------------------------------------------

def write_plots(run):
    """PNG plots in OUTPUT_DIR/plots; returns [(title, path relative to OUTPUT_DIR)] of those written."""
    train, evals = run.train_records, run.eval_records
    curves = {
        "loss": ("Loss", "loss", [("training", train, "loss", "-"), ("eval", evals, "eval_loss", "o-")]),
        "eval_loss_by_source": ("Eval loss by source", "loss", [
            (key.split("/", 1)[1], evals, key, "o-") for key in sorted({k for r in evals for k in r})
            if key.startswith("eval_loss/")]),
        "lr": ("Learning rate", "learning rate", [("lr", train, "lr", "-")]),
        "tokens_per_second": ("Throughput", "tokens / s", [("tokens/s", train, "tokens_per_second", "-")]),
    }
    os.makedirs(os.path.join(run.output_dir, PLOTS_DIR), exist_ok=True)
    written = []
    for name, (title, ylabel, series) in curves.items():
        series = [(label, [r["step"] for r in records if key in r], [r[key] for r in records if key in r], style)
                  for label, records, key, style in series]
        if not any(steps for _, steps, _, _ in series):
            continue
        path = os.path.join(PLOTS_DIR, f"{name}.png")
        _plot(os.path.join(run.output_dir, path), title, ylabel, series, run.events if name == "loss" else ())
        written.append((title, path))
    return written


def _plot(path, title, ylabel, series, events=()):
    # The Agg canvas directly, without pyplot: no display, no global backend switch inside train.py
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values, style in series:
        if steps:
            axes.plot(steps, values, style, label=label, markersize=4, linewidth=1.5)
    for kind, color, style in (("skipped", "tab:orange", ":"), ("applied", "tab:purple", ":"),
                               ("rollback", "tab:red", "--")):  # loss spikes: a line at each event's step
        for i, step in enumerate(e["step"] for e in events if e["event"] == kind):
            axes.axvline(step, color=color, linestyle=style, linewidth=1,
                         label=f"spike: {'rolled back to' if kind == 'rollback' else kind}" if i == 0 else None)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1 or events:
        axes.legend()
    tmp = temporary_name(path)  # a reader never sees half a PNG
    figure.savefig(tmp, dpi=100, format="png")
    publish(tmp, path)


# --- The report ------------------------------------------------------------------------------

def write_report(output_dir):
    """Write OUTPUT_DIR/report.md and its plots; returns the report's path."""
    run = load_run(output_dir)
    h = headline(run)
    lines = [f"# Training report: {run.name}", "", f"**Status:** {status_line(run)}", ""]
    if h["eval_loss"] is not None:
        lines += [f"**Eval perplexity {perplexity(h['initial_eval_loss']):.1f} → {perplexity(h['eval_loss']):.1f}** "
                  f"(loss {h['initial_eval_loss']:.4f} → {h['eval_loss']:.4f}, "
                  f"{perplexity(h['initial_eval_loss'] - h['eval_loss']):.1f}x lower)", ""]
    lines += ["## Metrics", "", metrics_table(run), ""]
    if sources_table(run):
        lines += ["## Sources", "", sources_table(run), ""]
    if cleaning_table(run):
        lines += ["## Cleaning (prepare_data.py --clean)", "", cleaning_table(run), ""]
    if events_table(run):
        lines += ["## Loss spikes", "", events_table(run), ""]
    if profile_table(run):
        lines += ["## Profile", "", profile_table(run), ""]
    lines += ["## Batch", "", batch_math(run), "",
              "## Config", "", config_table(run), ""]
    plots = write_plots(run)
    if plots:
        lines += ["## Curves", ""] + [f"![{title}]({path})\n" for title, path in plots]
    if run.results and run.results.get("sample"):
        lines += ["## Sample", "", f"Generated from `{run.config.get('sample_prompt', '')}` at the end:" if run.config
                  else "Generated at the end:", "", "> " + run.results["sample"].replace("\n", "\n> "), ""]
    path = os.path.join(output_dir, "report.md")
    return write_atomic(path, "\n".join(lines).rstrip() + "\n")
