"""`edgeprune sweep`: export every (strategy, budget) pair and measure speed, memory and answer quality.

Speed and memory come from one child process per bundle (the bench worker), so each peak RSS is
that bundle's own. Quality needs a JSONL of {"image", "question", "answer"}: every bundle answers
every question greedily, and we report
  agreement  the fraction of answers identical (token for token) to the full-budget model's; the
             full-budget bundle reproduces transformers' `generate`, so this is "same answer as the
             unpruned model";
  accuracy   the fraction whose answer contains the reference answer (case-insensitive).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import ConfigError, MissingDependencyError
from edgeprune.sample_image import SAMPLE_PROMPT

REFERENCE_BUDGET = 1.0


@dataclass(frozen=True)
class Question:
    image: str
    question: str
    answer: str


def load_questions(path: str | Path) -> list[Question]:
    """Reads a JSONL of {"image", "question", "answer"}; image paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data {path} does not exist; give a JSONL file of {{\"image\", \"question\", \"answer\"}}")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Path(row["image"])
            items.append(Question(str(image if image.is_absolute() else path.parent / image),
                                  str(row["question"]), str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{n}: expected a JSON object with image, question, answer ({e})") from None
    if not items:
        raise ConfigError(f"{path} holds no questions")
    return items


def parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{what} is empty")
    return values


def answers(bundle: Path, questions: list[Question], max_new_tokens: int) -> list[tuple[list[int], str]]:
    from edgeprune_runtime import Bundle

    with Bundle(bundle, verify_hashes=False) as b:
        return [(list(r.token_ids), r.text) for r in
                (b.generate(q.image, q.question, max_new_tokens=max_new_tokens) for q in questions)]


def run_sweep(model_name: str, base_recipe, strategies: list[str], budgets: list[float], out_dir: Path,
              model_dir: str | None = None, layers: int = 2, data: str | None = None, image: str | None = None,
              prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 16, on_stage=lambda s: None,
              precisions: list[str] = ("fp32",), vision_keeps: list[str] = ("",)) -> dict:
    """Exports and measures every (strategy, budget, precision, vision_keep); writes `sweep.json` and `sweep.png`
    into `out_dir`; returns the report. A row whose precision or vision_keep is not the default also gets its
    `drift` (edgeprune/drift.py) against the fp32, unpruned row of the same strategy and budget, when the grid has it."""
    from edgeprune import registry
    from edgeprune.bench import _child
    from edgeprune.export import export_bundle
    from edgeprune.sample_image import write_sample_image

    from edgeprune.plan import plan_shapes

    recipes = {(s, b, p, v): base_recipe.override(strategy=s, budget=b, precision=p, vision_keep=v)  # validates
               for s in strategies for b in budgets for p in precisions for v in vision_keeps}
    questions = load_questions(data) if data else []
    on_stage(f"load {model_name}")
    loaded = registry.get(model_name).loader(model_dir, layers=layers)
    for recipe in recipes.values():  # every static size (K >= 1, ...) checked before anything is written
        plan_shapes(loaded.config, loaded.processor.image_processor, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="edgeprune-sweep-") as tmp:
        timing_image = image or str(write_sample_image(Path(tmp) / "sample.png"))
        if questions:
            ref_dir = out_dir / f"reference-{REFERENCE_BUDGET}"
            on_stage("export the full-budget reference")
            export_bundle(model_name, ref_dir, base_recipe.override(strategy="hired", budget=REFERENCE_BUDGET,
                                                                    newlines="auto"),
                          model_options={"layers": layers}, loaded=loaded)
            on_stage(f"answer {len(questions)} questions at full budget")
            reference = answers(ref_dir, questions, max_new_tokens)
        for (strategy, budget, precision, keep), recipe in recipes.items():
            bundle = out_dir / (f"{strategy}-{budget}" + (f"-{precision}" if precision != "fp32" else "")
                                + (f"-keep{keep.replace(':', '_').replace(',', '-')}" if keep else ""))
            on_stage(f"export {strategy} at budget {budget}")
            export_bundle(model_name, bundle, recipe, model_options={"layers": layers}, loaded=loaded)
            on_stage(f"measure {strategy} at budget {budget}")
            speed = _child(["bundle", str(bundle), timing_image, prompt, str(max_new_tokens)])
            row = {"strategy": strategy, "budget": budget, "visual_tokens": speed["visual_tokens"],
                   "ttft_s": speed["ttft_s"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
                   "peak_rss_bytes": speed["peak_rss_bytes"], "bundle": str(bundle),
                   "precision": precision, "vision_keep": keep, "timings": speed.get("timings", {})}
            if questions:
                got = answers(bundle, questions, max_new_tokens)
                row["agreement"] = sum(g[0] == r[0] for g, r in zip(got, reference)) / len(questions)
                row["accuracy"] = sum(q.answer.strip().lower() in g[1].lower() for g, q in zip(got, questions)) / len(questions)
            rows.append(row)
        from edgeprune.drift import bundle_drift

        bases = {(r["strategy"], r["budget"]): r["bundle"] for r in rows if r["precision"] == "fp32" and not r["vision_keep"]}
        for row in rows:
            base = bases.get((row["strategy"], row["budget"]))
            if base and base != row["bundle"]:
                on_stage(f"drift of {Path(row['bundle']).name} against {Path(base).name}")
                drift = bundle_drift(row["bundle"], base, timing_image, prompt, max_new_tokens).to_dict()
                row["drift"] = {k: v for k, v in drift.items() if k != "logit_cosines"}
    from edgeprune.provenance import provenance, write_json

    report = {"model": model_name, "max_new_tokens": max_new_tokens, "questions": len(questions),
              "timing_image": image or "built-in sample (640x480)", "rows": rows, "provenance": provenance()}
    write_json(out_dir / "sweep.json", report)
    plot_sweep(report, out_dir / "sweep.png")
    return report


def plot_sweep(report: dict, out: Path) -> Path:
    """Speed/quality trade-off: time to first token (x) vs agreement with the full model (or visual tokens)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("the sweep plot needs matplotlib: pip install matplotlib") from None
    quality = "agreement" if report["questions"] else "visual_tokens"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    def series(r: dict) -> str:  # one line per strategy (and precision / vision schedule when swept)
        return " ".join([r["strategy"], *([r["precision"]] if r.get("precision", "fp32") != "fp32" else []),
                         *([f"keep {r['vision_keep']}"] if r.get("vision_keep") else [])])

    for label in dict.fromkeys(series(r) for r in report["rows"]):
        pts = sorted((r for r in report["rows"] if series(r) == label), key=lambda r: r["budget"])
        ax.plot([r["ttft_s"] for r in pts], [r[quality] for r in pts], marker="o", label=label)
        for r in pts:
            ax.annotate(f"{r['budget']:g}", (r["ttft_s"], r[quality]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("answers identical to full budget" if quality == "agreement" else "visual tokens in the LM")
    ax.set_title(f"{report['model']}: budget sweep (labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
