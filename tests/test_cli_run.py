"""`edgeprune run / inspect / compare / sweep` and `python -m edgeprune_runtime`, as a user runs them.

The checks the export/run issue states from outside: parity with transformers' `generate` for a
saved twin at budget 1.0 on images of every aspect ratio, `visual_tokens == K` at budget 0.2, the
same token ids from the runtime alone, and one clear line + non-zero exit for every bad input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_inputs import random_image

BIN = Path(sys.executable).parent
EDGEPRUNE = BIN / "edgeprune"
RAW_PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGES = {"square": (100, 100), "wide": (60, 200), "tall": (300, 90), "small": (50, 40), "photo": (480, 640)}


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEPRUNE), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def runtime_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune_runtime", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def saved_twin(tmp_path_factory):
    """The tiny twin written by `edgeprune tiny`, and its budget-1.0 export via `--model DIR`."""
    root = tmp_path_factory.mktemp("twin")
    assert cli("tiny", "llava-next-tiny", root / "ckpt").returncode == 0
    result = cli("export", "llava-next", "--model", root / "ckpt", "--budget", "1.0", "--out", root / "b1")
    assert result.returncode == 0, result.stderr
    return root / "ckpt", root / "b1"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, hw in IMAGES.items():
        paths[name] = root / f"{name}.png"
        random_image(hw, seed=3).save(paths[name])
    return paths


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_run_reproduces_transformers_generate(saved_twin, images, image):
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    ckpt, bundle = saved_twin
    model = LlavaNextForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = LlavaNextProcessor.from_pretrained(ckpt)
    inputs = processor(images=Image.open(images[image]), text=RAW_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()

    result = cli("run", bundle, "--image", images[image], "--prompt", RAW_PROMPT, "--raw-prompt", "--json",
                 "--max-new-tokens", 12)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["token_ids"] == expected
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert got["visual_tokens"] == n_image_tokens


def test_budget_02_sees_exactly_k_visual_tokens(tiny_bundles, images):
    from edgeprune_runtime.manifest import load_manifest

    k = load_manifest(tiny_bundles[0.2]).shapes.visual_topk
    for image in ("photo", "wide"):
        result = cli("run", tiny_bundles[0.2], "--image", images[image], "--prompt", "What is here?", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["visual_tokens"] == k
        for key in ("token_ids", "text", "ttft_s", "decode_tokens_per_s"):
            assert key in report


def test_runtime_module_gives_the_same_tokens(tiny_bundles, images):
    args = [tiny_bundles[0.2], "--image", images["photo"], "--prompt", "What is on the table?", "--json",
            "--max-new-tokens", 8]
    ours, alone = cli("run", *args), runtime_cli(*args)
    assert ours.returncode == alone.returncode == 0, ours.stderr + alone.stderr
    assert json.loads(ours.stdout)["token_ids"] == json.loads(alone.stdout)["token_ids"]


def test_run_streams_text_and_a_summary(tiny_bundles, images):
    args = [tiny_bundles[0.2], "--image", images["photo"], "--prompt", "What is here?", "--max-new-tokens", 5]
    streamed, report = cli("run", *args), cli("run", *args, "--json")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == json.loads(report.stdout)["text"]
    assert "5 tokens" in streamed.stderr and "ttft" in streamed.stderr


@pytest.fixture
def bad_inputs(tmp_path, tiny_bundles, images):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundles[0.2], tampered)
    with open(tampered / "lm" / "lm.weights", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03\x04")
    future = tmp_path / "future"
    shutil.copytree(tiny_bundles[0.2], future)
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    return {"corrupt": corrupt, "tampered": tampered, "future": future, "photo": images["photo"],
            "bundle": tiny_bundles[0.2]}


BAD_RUNS = {
    "missing image": (lambda b: [b["bundle"], "--image", "/nonexistent/cam.jpg", "--prompt", "hi"], "cam.jpg"),
    "corrupt image": (lambda b: [b["bundle"], "--image", b["corrupt"], "--prompt", "hi"], "corrupt.jpg"),
    "prompt too long": (lambda b: [b["bundle"], "--image", b["photo"], "--prompt", "what is it " * 40],
                        "text_slots_after_image"),
    "raw prompt without image": (lambda b: [b["bundle"], "--image", b["photo"], "--prompt", "hi", "--raw-prompt"],
                                 "<image>"),
    "tampered file": (lambda b: [b["tampered"], "--image", b["photo"], "--prompt", "hi"], "lm/lm.weights"),
    "unknown schema": (lambda b: [b["future"], "--image", b["photo"], "--prompt", "hi"], "schema version 99"),
    "missing bundle": (lambda b: ["/nonexistent/bundle", "--image", b["photo"], "--prompt", "hi"], "does not exist"),
    "max-new-tokens beyond the cache": (lambda b: [b["bundle"], "--image", b["photo"], "--prompt", "hi",
                                                   "--max-new-tokens", 5000], "new_token_slots"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_inputs(bad_inputs, case):
    argv, pattern = BAD_RUNS[case]
    one_error_line(cli("run", *argv(bad_inputs)), pattern)
    one_error_line(runtime_cli(*argv(bad_inputs)), pattern)


def test_prompt_too_long_names_the_slots(bad_inputs):
    result = cli("run", bad_inputs["bundle"], "--image", bad_inputs["photo"], "--prompt", "what is it " * 40)
    assert "the bundle has 32" in result.stderr  # the tiny recipe's text_slots_after_image


def test_inspect_json_and_png(tiny_bundles, images, tmp_path):
    from PIL import Image

    out = tmp_path / "kept.png"
    result = cli("inspect", tiny_bundles[0.2], "--image", images["photo"], "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["strategy"] == "hired" and report["budget"] == 0.2
    assert report["grid"] == [2, 2] and report["partitions"] == 5 and report["patch_grid"] == [8, 8]
    assert len(report["kept"]) == report["k"] == 64
    assert all(0 <= p < 5 and 0 <= r < 8 and 0 <= c < 8 for p, r, c in report["kept"])
    assert len({tuple(t) for t in report["kept"]}) == 64
    picture = Image.open(out)
    assert picture.size[0] > 224 and picture.mode == "RGB"


def test_inspect_agrees_with_run(tiny_bundles, images):
    """The kept count inspect shows is what the LM sees (no newline slots at budget 0.2)."""
    kept = json.loads(cli("inspect", tiny_bundles[0.2], "--image", images["wide"], "--json").stdout)["kept"]
    seen = json.loads(cli("run", tiny_bundles[0.2], "--image", images["wide"], "--prompt", "hi", "--json",
                          "--max-new-tokens", 1).stdout)["visual_tokens"]
    assert len(kept) == seen


def test_inspect_rejects_a_non_image(tiny_bundles, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("just text")
    one_error_line(cli("inspect", tiny_bundles[0.2], "--image", text), "notes.png")


@pytest.mark.parametrize("strategy", ["hired", "hired-reference", "visionzip", "uniform", "random", "global-topk"])
def test_compare_passes_for_every_strategy(tmp_path, images, strategy):
    """Polygraphy: the ONNX vision graph (and the LM) equal eager PyTorch for each strategy."""
    bundle = tmp_path / strategy
    assert cli("export", "llava-next-tiny", "--budget", "0.2", "--strategy", strategy, "--out", bundle).returncode == 0
    result = cli("compare", bundle, "--image", images["wide"], "--json", "--atol", "1e-5", "--rtol", "1e-3")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["passed"], report
    vision = {r["output"]: r for r in report["outputs"] if r["stage"] == "vision"}
    assert vision["visual_source"]["max_absdiff"] == 0 and vision["visual_valid"]["max_absdiff"] == 0
    assert {r["stage"] for r in report["outputs"]} == {"vision", "prefill", "decode", "step"}


def test_compare_fails_on_a_model_that_is_not_the_source(tmp_path, images, saved_twin):
    _, bundle = saved_twin
    other = tmp_path / "other"
    assert cli("tiny", "llava-next-tiny", other).returncode == 0
    import safetensors.torch as st

    weights = st.load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    st.save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    one_error_line(cli("compare", bundle, "--image", images["wide"], "--model", other), "weights hash differs")


def test_sweep_table_json_and_plot(tmp_path, images):
    data = tmp_path / "qa.jsonl"
    rows = [{"image": str(images["photo"]), "question": "What is on the table?", "answer": "cup"},
            {"image": images["wide"].name, "question": "What color?", "answer": "red"},
            {"image": images["wide"].name, "question": "Anything?", "answer": ""}]  # "" is in every answer
    shutil.copy(images["wide"], tmp_path / images["wide"].name)  # relative paths resolve next to the JSONL
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "sweep"
    result = cli("sweep", "llava-next-tiny", "--budgets", "0.2,1.0", "--strategies", "hired,uniform",
                 "--data", data, "--out", out, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert [(r["strategy"], r["budget"]) for r in report["rows"]] == [
        ("hired", 0.2), ("hired", 1.0), ("uniform", 0.2), ("uniform", 1.0)]
    for r in report["rows"]:
        assert r["ttft_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["accuracy"] in (1 / 3, 2 / 3, 1.0)  # 3 questions, the empty answer always counts
        if r["budget"] == 1.0:
            assert r["agreement"] == 1.0  # every strategy keeps everything at budget 1.0
    full = [r["accuracy"] for r in report["rows"] if r["budget"] == 1.0]
    assert full[0] == full[1]  # identical answers at full budget
    assert (out / "sweep.png").stat().st_size > 1000
    assert "agreement" in result.stdout


@pytest.mark.parametrize("args, pattern", [
    (["--budgets", "0.2,abc"], "--budgets must be a comma-separated list"),
    (["--strategies", "hird"], "Did you mean 'hired'"),
    (["--data", "/nonexistent.jsonl"], "does not exist"),
    (["--budgets", "0.001"], "keeps no visual token"),
])
def test_sweep_bad_input(tmp_path, args, pattern):
    result = cli("sweep", "llava-next-tiny", *args, "--out", tmp_path / "s")
    one_error_line(result, pattern)


@pytest.mark.parametrize("args, pattern", [
    (["--strategy", "hird"], "Did you mean 'hired'"),
    (["--strategy", "hired", "--alpha", "1.5"], "alpha must be in [0, 1]"),
])
def test_export_bad_selection_flags(tmp_path, args, pattern):
    one_error_line(cli("export", "llava-next-tiny", *args, "--out", tmp_path / "b"), pattern)
    assert not (tmp_path / "b").exists()
