"""``diff-transformer report DIR...``: one self-contained HTML page (and the same tables as Markdown) from
sweep or compare folders.

Everything is read back from the run directories (``run.json``, ``metrics.jsonl``, ``evals/<task>.json``),
so evaluations written after the training show up. The page has no scripts and no external URLs: plots
are PNGs embedded as base64 ``data:`` URIs. Every string taken from a file is HTML-escaped (Markdown
cells have ``<``, ``&``, ``|`` and newlines escaped), because folders may come from anywhere.

A run's group is its path inside the folder without the ``seed_<s>`` part (``diff``, ``diff/lr_0.001``);
the reference is the sweep's ``--reference`` (a compare's second model) at the same lr, paired by seed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from .errors import UserError

SEED_DIR = re.compile(r"^seed_(-?\d+)$")


# Reading ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): pass a sweep or compare folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: pass a sweep or compare folder")
    return data


def load_folder(folder: Path) -> dict:
    """The runs of a sweep or compare folder, grouped, with the reference group's name."""
    from .train.results import read_run

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass sweep or compare output folders")
    if (folder / "sweep.json").is_file():
        kind, meta = "sweep", _read_json(folder / "sweep.json")
        reference = meta.get("reference")
    elif (folder / "compare.json").is_file():
        kind, meta = "compare", _read_json(folder / "compare.json")
        variants = meta.get("variants")
        reference = variants[1] if isinstance(variants, list) and len(variants) == 2 else "baseline"
    else:
        raise UserError(f"{folder} holds neither sweep.json nor compare.json: pass sweep or compare output folders")
    runs: dict[str, dict[int, dict]] = {}
    for run_json in sorted(folder.rglob("run.json")):
        run_dir = run_json.parent
        if "checkpoints" in run_dir.relative_to(folder).parts:
            continue
        parts = list(run_dir.relative_to(folder).parts)
        seeds = [i for i, p in enumerate(parts) if SEED_DIR.match(p)]
        if not seeds:
            continue
        seed = int(SEED_DIR.match(parts[seeds[-1]]).group(1))
        group = "/".join(p for i, p in enumerate(parts) if i != seeds[-1])
        try:
            runs.setdefault(group, {})[seed] = read_run(run_dir)
        except UserError as e:
            raise UserError(f"{run_dir}: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise UserError(f"{run_dir}: cannot read its run.json/metrics.jsonl ({type(e).__name__}: {e})") from None
    if not runs:
        raise UserError(f"{folder} holds no run directories (<name>/seed_<s>/run.json): nothing to report")
    return {"folder": folder, "kind": kind, "reference": str(reference) if reference is not None else None,
            "groups": runs}


def _ref_group(group: str, reference: str | None, groups: dict) -> str | None:
    """The reference's group at the same lr: swap the variant part of ``group`` for ``reference``."""
    if reference is None:
        return None
    parts = group.split("/")
    candidates = [reference] + (["/".join([reference] + parts[1:])] if len(parts) > 1 else [])
    for c in reversed(candidates):
        if c in groups:
            return c
    return None


def summarise(data: dict) -> list[dict]:
    """One row per group: params, FLOPs, final loss mean ± std, paired difference to the reference, speed,
    loss at the reference's FLOPs / training time."""
    from .train.results import loss_at
    from .train.stats import mean_std, paired_difference

    groups, rows = data["groups"], []
    for name, runs in groups.items():
        ref_name = _ref_group(name, data["reference"], groups)
        ref = groups.get(ref_name, {}) if ref_name else {}
        seeds = sorted(runs)
        finals = [runs[s]["final_val_loss"] for s in seeds]
        loss = mean_std(finals)
        any_run = runs[seeds[0]]
        row = {"group": name, "reference": ref_name, "seeds": seeds, "params": any_run["params"],
               "flops_per_token": any_run["flops_per_token"], "epochs_tokens": any_run["tokens"],
               "val_loss_mean": loss[0], "val_loss_std": loss[1],
               "tokens_per_s": mean_std([runs[s]["tokens_per_s"] for s in seeds])[0],
               "vs_reference": None if ref_name in (None, name) else paired_difference(
                   finals, [ref.get(s, {}).get("final_val_loss") for s in seeds])}
        for axis, field in (("flops", "train_flops"), ("seconds", "train_seconds")):
            vals, missing = [], []
            for s in seeds:
                r = ref.get(s)
                if not r or r.get(field) is None:
                    continue
                y = loss_at(runs[s], axis, r[field])
                (missing if y is None else vals).append(s if y is None else y)
            m = mean_std(vals)
            row[f"at_ref_{axis}"] = {"mean": m[0], "std": m[1], "not_reaching": missing}
        rows.append(row)
    return rows


# Formatting ---------------------------------------------------------------------------------------------
def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "—"


def _pm(mean, std, fmt=".4f") -> str:
    return f"{_num(mean, fmt)} ± {_num(std, fmt)}" if mean is not None else "—"


RESULT_HEADER = ["variant", "seeds", "params", "FLOP/token", "val loss (mean ± std)", "Δ vs reference [95% CI]",
                 "n", "p", "tokens/s (median step)", "loss @ ref FLOPs", "loss @ ref time"]


def result_cells(row: dict) -> list[str]:
    d = row["vs_reference"]
    delta = "—" if not d else f"{_num(d['mean'], '+.4f')} [{_num(d['ci_low'], '+.3f')}, {_num(d['ci_high'], '+.3f')}]"

    def at(m):
        txt = _pm(m["mean"], m["std"])
        return txt + (f" (seeds {m['not_reaching']} did not reach it)" if m["not_reaching"] else "")

    return [row["group"], ", ".join(map(str, row["seeds"])), _num(row["params"], ",d"),
            _num(row["flops_per_token"], ".3e"), _pm(row["val_loss_mean"], row["val_loss_std"]), delta,
            str(d["n"]) if d else "—", _num(d["p_value"], ".3g") if d else "—", _num(row["tokens_per_s"], ",.0f"),
            at(row["at_ref_flops"]), at(row["at_ref_seconds"])]


def eval_tables(data: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{task: (header, rows)}``: rows = groups, columns = metrics, mean ± std over seeds."""
    from .train.stats import mean_std

    tasks: dict[str, dict[str, dict[str, list]]] = {}
    for group, runs in data["groups"].items():
        for seed in sorted(runs):
            for task, summary in runs[seed]["evals"].items():
                for metric, value in summary.items():
                    tasks.setdefault(task, {}).setdefault(group, {}).setdefault(metric, []).append(value)
    out = {}
    for task, by_group in sorted(tasks.items()):
        metrics = sorted({m for g in by_group.values() for m in g})
        rows = []
        for group, vals in by_group.items():
            cells = [group]
            for m in metrics:
                mean, std = mean_std(vals.get(m, []))
                cells.append(_pm(mean, std) + (f" (n={len([v for v in vals.get(m, []) if v is not None])})"
                                               if mean is not None else ""))
            rows.append(cells)
        out[task] = (["variant", *metrics], rows)
    return out


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(s: str) -> str:
    """A Markdown table cell: inline HTML is escaped too (Markdown renderers pass it through)."""
    s = html.escape(s, quote=False)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# Plots ----------------------------------------------------------------------------------------------------
def _tex_safe(text: str) -> str:
    """A folder name as a matplotlib label: '$' would start mathtext (and fail on hostile names)."""
    return text.replace("$", r"\$")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mean_band(curves: list[list]) -> tuple[list, list, list]:
    """Mean and std over runs at the x values every run has: curves are [[x, y], ...]."""
    from .train.stats import mean_std

    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves))) if curves else []
    maps = [dict((x, y) for x, y in c) for c in curves]
    means, stds = [], []
    for x in common:
        m, s = mean_std([mp[x] for mp in maps])
        means.append(m if m is not None else math.nan)
        stds.append(s or 0.0)
    return common, means, stds


def _colour(i: int, n: int):
    """A distinct colour for series ``i`` of ``n`` (tab10 up to 10 series, tab20 up to 20, then cycling)."""
    import matplotlib.pyplot as plt

    return plt.get_cmap("tab10")(i % 10) if n <= 10 else plt.get_cmap("tab20")(i % 20)


def _legend_outside(axes, fontsize: float = 7) -> None:
    """One legend, right of the last of ``axes``, for every labelled line in any of them (once a label)."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        axes[-1].legend(list(seen.values()), list(seen), fontsize=fontsize, loc="upper left",
                        bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


PER_LAYER_MAX_VARIANTS = 3  # above this the instrumentation plot shows each variant's mean over layers


def plots(data: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the folder's figures, readable from one variant to twenty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = data["groups"]
    out = []
    # Validation loss: the whole run, and its second half zoomed in (where the arms separate).
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    tail = []  # the second half's finite means, for its y range
    for i, (name, runs) in enumerate(groups.items()):
        tps = next(iter(runs.values()))["tokens_per_step"]
        xs, m, s = _mean_band([r["eval_curve"] for r in runs.values()])
        if not xs:
            continue
        whole = [(x * tps, a, b) for x, a, b in zip(xs, m, s)]
        second = [p for p in whole if p[0] >= whole[-1][0] / 2]
        tail += [a for _, a, _ in second if math.isfinite(a)]
        for ax, pts in ((axes[0], whole), (axes[1], second)):
            t, a, b = zip(*pts)
            ax.plot(t, a, color=_colour(i, len(groups)), marker="o", ms=2.5, lw=1.2,
                    label=_tex_safe(f"{name} (n={len(runs)})"))
            ax.fill_between(t, [x - y for x, y in zip(a, b)], [x + y for x, y in zip(a, b)],
                            color=_colour(i, len(groups)), alpha=0.15)
    from matplotlib.ticker import EngFormatter

    for ax, title in zip(axes, ("whole run", "second half")):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 160k, 10M: no overlapping raw integers
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    if tail and max(tail) > min(tail):
        pad = 0.05 * (max(tail) - min(tail))
        axes[1].set_ylim(min(tail) - pad, max(tail) + pad)
    _legend_outside(axes)
    fig.tight_layout()
    out.append(("Validation loss per variant (mean ± std over seeds)", _png(fig)))

    lam = {n: r for n, r in groups.items() if any(x["lambdas"] for x in r.values())}
    if lam:
        cols = min(4, len(lam))
        rows = -(-len(lam) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (name, runs) in zip(axes.flat, lam.items()):
            trajs = [r["lambdas"] for r in runs.values() if r["lambdas"]]
            n_layers = len(trajs[0][0][1])
            for layer in range(n_layers):
                xs, m, s = _mean_band([[[st, v[layer]] for st, v in t] for t in trajs])
                ax.plot(xs, m, color=plt.get_cmap("viridis")(layer / max(1, n_layers - 1)), label=f"layer {layer}")
            ax.set_title(_tex_safe(f"λ: {name}"), fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(lam):]:
            ax.set_visible(False)
        fig.tight_layout()
        out.append(("λ per layer during training (mean over seeds)", _png(fig)))

    inst = {n: r for n, r in groups.items() if any(x["o_proj_in_rms"] for x in r.values())}
    if inst:
        per_layer = len(inst) <= PER_LAYER_MAX_VARIANTS
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        styles = ["-", "--", ":", "-."]
        for i, (name, runs) in enumerate(inst.items()):
            for ax, key in zip(axes, ("o_proj_in_rms", "head_norm_gain")):
                trajs = [r[key] for r in runs.values() if r[key]]
                if not trajs or all(v is None for v in trajs[0][0][1]):
                    continue
                n_layers = len(trajs[0][0][1])
                if per_layer:
                    for layer in range(n_layers):
                        curves = [[[st, v[layer]] for st, v in t if v[layer] is not None] for t in trajs]
                        xs, m, _ = _mean_band(curves)
                        ax.plot(xs, m, color=_colour(i, len(inst)), ls=styles[layer % 4], lw=1,
                                label=_tex_safe(f"{name} layer {layer}"))
                else:  # one line a variant: its mean over layers
                    curves = [[[st, sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))]
                               for st, v in t if any(x is not None for x in v)] for t in trajs]
                    xs, m, _ = _mean_band(curves)
                    ax.plot(xs, m, color=_colour(i, len(inst)), lw=1.2, label=_tex_safe(name))
        axes[0].set_title("RMS of the attention output into o_proj")
        axes[1].set_title("per-head norm gain (mean of its weight)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        _legend_outside(axes, 6 if per_layer else 7)  # a variant without a norm has a line on the left only
        fig.tight_layout()
        title = ("Instrumentation per layer (colour = variant, line style = layer; mean over seeds)" if per_layer else
                 "Instrumentation (colour = variant; mean over layers and seeds; per-layer values in metrics.jsonl)")
        out.append((title, _png(fig)))
    return out


# The page -------------------------------------------------------------------------------------------------
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}"
       "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}"
       "p.note{color:#555;font-size:13px}")


def write_report(folders, out) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with suffix .md; returns both paths."""
    from .train.results import SPEED_NOTE

    datas = [load_folder(Path(f)) for f in folders]  # every folder is checked before anything is written
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name such as report.html")
    e = html.escape
    body, md = [], ["# diff-transformer report", ""]
    for data in datas:
        label = f"{data['kind']} {data['folder']}"
        body.append(f"<h2>{e(label)}</h2>")
        md += [f"## {_md_cell(label)}", ""]
        rows = summarise(data)
        cells = [result_cells(r) for r in rows]
        ref = data["reference"] or "—"
        note = (f"Reference: {ref}, paired by seed (same lr). Δ = variant − reference, negative favours the variant; "
                "CI: Student t on n−1 dof; p: paired two-sided t-test. Loss @ ref FLOPs / time: the validation "
                "curve interpolated at the reference run's total training FLOPs (6·N_non-emb + 12·L·seq·width, "
                f"DIFF V1 attention ×16/14) / training seconds. {SPEED_NOTE}.")
        body += ["<h3>Results</h3>", _html_table(RESULT_HEADER, cells), f"<p class='note'>{e(note)}</p>"]
        md += ["### Results", "", _md_table(RESULT_HEADER, cells), "", _md_cell(note), ""]
        try:
            figures = plots(data)
        except ImportError:
            figures = []
            body.append("<p class='note'>matplotlib is not installed: no plots.</p>")
        for title, png in figures:
            body.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
        for task, (header, trows) in eval_tables(data).items():
            body += [f"<h3>Evaluation: {e(task)}</h3>", _html_table(header, trows)]
            md += [f"### Evaluation: {_md_cell(task)}", "", _md_table(header, trows), ""]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>diff-transformer report</title>"
            f"<style>{CSS}</style></head><body><h1>diff-transformer report</h1>{''.join(body)}</body></html>\n")
    from .fileio import write_bytes_atomically as atomic_write_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    md_path = out.with_suffix(".md")
    atomic_write_bytes(out, page.encode())
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())
    return out, md_path
