"""The model card (README.md) of a published artifact: Hub metadata in YAML front matter, made by
huggingface_hub's `ModelCardData` (base_model, library_name, pipeline_tag, tags, license and a
model-index of the parity and latency results), then in words what was built from what, how to
load and run it, the parity and latency tables with the machine, and the plots.

Everything comes from the build's manifest through `results.BuildResult` and the target's own
toolchain.json (the artifact's facts); nothing is guessed: a field that is not known is left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from toolchain.delivery.report import LATENCY_HEADER, PARITY_HEADER, _table, latency_rows, parity_rows
from toolchain.delivery.results import FAILED, NOT_GATED, NOT_RUN, PASSED, BuildResult, VariantResult, fmt

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
# transformers' Auto class for a task (the load step records the task)
AUTO_CLASS = {"feature-extraction": "AutoModel", "text-generation": "AutoModelForCausalLM",
              "text-classification": "AutoModelForSequenceClassification", "fill-mask": "AutoModelForMaskedLM",
              "token-classification": "AutoModelForTokenClassification",
              "question-answering": "AutoModelForQuestionAnswering"}
LIBRARY = {"onnx-model": "onnx", "aoti-package": "pytorch", "hf-model": "transformers"}


@dataclass
class CardInput:
    build: BuildResult
    variant: VariantResult
    target: str  # the step published
    meta: dict  # the target's toolchain.json
    source: dict  # {type, uri, sha256, base_model, license}
    files: list[str]  # every published path (the card itself and the statement excluded)
    plots: list[str] = field(default_factory=list)  # published paths of the plots
    not_run: list[str] = field(default_factory=list)  # checks that did not run (published with --allow-not-run)
    hub_repo: str | None = None  # org/name when the destination is the Hub
    hub_revision: str | None = None


def tags(meta: dict) -> list[str]:
    """precision, quantization, attention, provider and compile backend of the artifact, as Hub tags."""
    out = ["toolchain"]
    if meta.get("dtype"):
        out.append(f"precision:{meta['dtype']}")
    if meta.get("quantization"):
        q = meta["quantization"]
        out.append(f"quantization:{q.get('method', q) if isinstance(q, dict) else q}")
    if meta.get("attention"):
        out.append(f"attention:{meta['attention']}")
    if meta.get("provider"):
        out.append(f"provider:{meta['provider']}")
    compile_ = meta.get("compile")
    if isinstance(compile_, dict) and compile_.get("backend"):
        out.append(f"compile:{compile_['backend']}")
    if meta.get("artifact") == "onnx-model":
        out.append("onnx")
    return out


def _eval_results(card: CardInput, task: str | None):
    from huggingface_hub import EvalResult

    name = f"{card.build.name}/{card.target}"
    results = []
    for s in card.variant.steps:
        p = s.parity
        if p is not None and not p.not_gated:
            for o in p.outputs:
                results.append(EvalResult(
                    task_type=task or "feature-extraction", dataset_type=p.corpus or "unknown",
                    dataset_name=f"parity against {p.reference} ({p.samples or '?'} samples of {p.corpus})",
                    metric_type="max_abs_diff", metric_name=f"max abs difference: {o.name}",
                    metric_value=float(o.max_abs), verified=False,
                    metric_config=f"{s.name}: atol {fmt(o.atol)}, {o.status}"))
        if s.latency is not None:
            for t in s.latency.timings:
                if t.median_ms is None:
                    continue
                results.append(EvalResult(
                    task_type=task or "feature-extraction", dataset_type="synthetic",
                    dataset_name=f"latency batch {s.latency.batch_size} x sequence {s.latency.sequence_length}",
                    metric_type="latency_median_ms", metric_name=f"median latency {t.measure} ({s.name}, ms)",
                    metric_value=float(t.median_ms), verified=False,
                    metric_config=f"{s.latency.runtime} on {s.latency.device_name or 'unknown device'}"))
    return name, results


def card_data(card: CardInput):
    """huggingface_hub.ModelCardData for the front matter."""
    from huggingface_hub import ModelCardData

    meta = card.meta
    task = meta.get("task")
    name, results = _eval_results(card, task)
    return ModelCardData(base_model=card.source.get("base_model"), license=card.source.get("license"),
                         library_name=LIBRARY.get(meta.get("artifact")), pipeline_tag=task, tags=tags(meta),
                         model_name=name, eval_results=results or None)


def snippet(card: CardInput) -> str:
    """Python that loads the artifact and runs it once on a sentence, with the runtime it was built for."""
    meta = card.meta
    graph = meta.get("graph") or {}
    if card.hub_repo:
        rev = f", revision={card.hub_revision!r}" if card.hub_revision else ""
        where = ["from huggingface_hub import snapshot_download", "",
                 f"folder = snapshot_download({card.hub_repo!r}{rev})"]
    else:
        where = ["", "folder = \".\"  # the folder these files were published to (or downloaded into)"]
    tok = ["tokenizer = AutoTokenizer.from_pretrained(folder)",
           "batch = tokenizer([\"The quick brown fox jumps over the lazy dog.\"], return_tensors=\"np\")"]
    artifact = meta.get("artifact")
    if artifact == "onnx-model" and graph.get("kv_cache"):
        provider = ORT_PROVIDERS.get(meta.get("provider") or "cpu", "CPUExecutionProvider")
        dtype = "np.float16" if meta.get("dtype") == "float16" else "np.float32"
        lines = ["import numpy as np", "import onnxruntime as ort", "from transformers import AutoTokenizer",
                 *where, "tokenizer = AutoTokenizer.from_pretrained(folder)",
                 f"session = ort.InferenceSession(f\"{{folder}}/{graph.get('file', 'model.onnx')}\", "
                 f"providers=[{provider!r}])",
                 "takes = {i.name for i in session.get_inputs()}",
                 "names = [o.name for o in session.get_outputs()]",
                 "# greedy decoding with the KV cache: each step feeds the new token and the past keys/values",
                 f"past = {{n: np.zeros((1, {graph.get('kv_heads')}, 0, {graph.get('head_dim')}), dtype={dtype})",
                 "        for n in takes if n.startswith(\"past_key_values.\")}",
                 "step = tokenizer(\"The quick brown fox\", return_tensors=\"np\")[\"input_ids\"].astype(np.int64)",
                 "done, new = 0, []",
                 "for _ in range(16):",
                 "    total = done + step.shape[1]",
                 "    feed = {\"input_ids\": step, \"attention_mask\": np.ones((1, total), np.int64),",
                 "            \"position_ids\": np.arange(done, total, dtype=np.int64)[None], **past}",
                 "    out = dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in takes})))",
                 "    token = int(out[\"logits\"][0, -1].argmax())",
                 "    new.append(token)",
                 "    past = {n.replace(\"present.\", \"past_key_values.\"): v for n, v in out.items() if n.startswith(\"present.\")}",
                 "    done, step = total, np.array([[token]], dtype=np.int64)",
                 "print(tokenizer.decode(new))"]
    elif artifact == "onnx-model":
        provider = ORT_PROVIDERS.get(meta.get("provider") or "cpu", "CPUExecutionProvider")
        inputs = graph.get("inputs") or ["input_ids", "attention_mask"]
        lines = ["import numpy as np", "import onnxruntime as ort", "from transformers import AutoTokenizer",
                 *where, *tok,
                 f"session = ort.InferenceSession(f\"{{folder}}/{graph.get('file', 'model.onnx')}\", "
                 f"providers=[{provider!r}])",
                 "feeds = {name: batch[name].astype(np.int64) if name in batch else np.zeros_like(batch[\"input_ids\"], "
                 "dtype=np.int64)",
                 f"         for name in {inputs!r}}}",
                 "outputs = session.run(None, feeds)",
                 f"print({(graph.get('outputs') or ['output'])[0]!r}, outputs[0].shape)"]
    elif artifact == "aoti-package":
        spec = meta.get("compile") or {}
        inputs = spec.get("inputs") or graph.get("inputs") or ["input_ids", "attention_mask"]
        device = "cuda" if (meta.get("device") or "cpu").startswith("cuda") else "cpu"
        lines = ["import torch", "from transformers import AutoTokenizer", *where, *tok,
                 f"runner = torch._inductor.aoti_load_package(f\"{{folder}}/model.pt2\")  # built for {device}",
                 f"feeds = {{name: torch.from_numpy(batch[name] if name in batch else 0 * batch[\"input_ids\"])"
                 f".to({device!r})",
                 f"         for name in {inputs!r}}}",
                 "outputs = runner(**feeds)",
                 "print(type(outputs))"]
    else:
        auto = AUTO_CLASS.get(meta.get("task") or "", "AutoModel")
        lines = ["import torch", f"from transformers import AutoTokenizer, {auto}", *where,
                 "tokenizer = AutoTokenizer.from_pretrained(folder)",
                 f"model = {auto}.from_pretrained(folder).eval()",
                 "batch = tokenizer([\"The quick brown fox jumps over the lazy dog.\"], return_tensors=\"pt\")",
                 "with torch.no_grad():", "    outputs = model(**batch)", "print(outputs[0].shape)"]
    return "\n".join(lines) + "\n"


def _what(card: CardInput) -> str:
    b, meta = card.build, card.meta
    graph = meta.get("graph") or {}
    step = next(s for s in card.variant.steps if s.name == card.target)
    facts = [f"artifact: {meta.get('artifact', '?')}", f"precision: {meta.get('dtype') or '?'}"]
    for k in ("quantization", "attention", "provider"):
        if meta.get(k):
            facts.append(f"{k}: {meta[k]}")
    if graph:
        facts.append(f"ONNX opset {graph.get('opset')}, {graph.get('exporter')} exporter, inputs "
                     f"{', '.join(graph.get('inputs') or [])}")
    if isinstance(meta.get("compile"), dict):
        c = meta["compile"]
        facts.append("compiled: " + ", ".join([f"{k} {v}" for k, v in sorted(c.items())
                                               if isinstance(v, (str, int, float, bool))]
                                              + [f"Inductor {k}" for k in sorted(c.get("options") or {})]))
    src = card.source
    lines = [f"Built by toolchain {b.toolchain} from the recipe `{b.name}`"
             + (f" (variant {card.variant.label})" if card.variant.label else "")
             + f": step `{card.target}` (kind {step.kind}, key `{step.key[:16]}`).", "",
             f"- source model: {src.get('uri') or src.get('type')}"
             + (f" (content sha256 `{src['sha256'][:16]}...`)" if src.get("sha256") else ""),
             *[f"- {f}" for f in facts],
             f"- build status: {b.status}, created {b.created}"]
    if b.description:
        lines += ["", b.description.strip()]
    return "\n".join(lines) + "\n"


def _checks(card: CardInput) -> str:
    checks = [c for s in card.variant.steps for c in s.checks(card.build.suite(card.variant, s))]
    counts = {k: sum(c.status == k for c in checks) for k in (PASSED, FAILED, NOT_GATED, NOT_RUN)}
    text = ("Checks of this build: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ".\n"
            if checks else "This build ran no checks.\n")
    if card.not_run:
        text += ("\n> **Published with `--allow-not-run`: these checks did not run, so nothing here vouches "
                 "for them:**\n" + "".join(f"> - {w}\n" for w in card.not_run))
    return text


def _machine(card: CardInput) -> str:
    env = card.build.environment
    hw = env.get("hardware") or {}
    gpus = env.get("gpus") or []
    parts = [f"CPU {hw.get('cpu', '?')} ({hw.get('cores', '?')} cores)"]
    if gpus:
        parts.append("GPU " + ", ".join(str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in gpus))
    parts += [f"{k} {env[k]}" for k in ("python", "torch", "transformers", "onnxruntime") if env.get(k)]
    return "; ".join(parts)


def render(card: CardInput) -> str:
    """README.md: YAML front matter (ModelCardData) and the body."""
    from huggingface_hub import ModelCard

    data = card_data(card)
    body = [f"# {card.build.name}: {card.target}\n", _what(card), "## How to use\n",
            "```python\n" + snippet(card) + "```\n", "## Checks\n", _checks(card)]
    for s in card.variant.steps:
        p = s.parity
        if p is not None and p.not_gated:
            body.append(f"### Parity: {s.name}\n\nnot gated: {p.not_gated}\n")
        elif p is not None:
            body.append(f"### Parity: {s.name}\n\n{p.candidate} against {p.reference}, {p.samples} samples of "
                        f"{p.corpus} ({p.precision or '?'} tolerances).\n\n" + _table(PARITY_HEADER, parity_rows(p)))
        if s.latency is not None:
            lat = s.latency
            body.append(f"### Latency: {s.name}\n\n{lat.runtime} on {lat.device_name or '?'}, batch {lat.batch_size}, "
                        f"sequence {lat.sequence_length}, {lat.timer or 'timer ?'}.\n\n"
                        + _table(LATENCY_HEADER, latency_rows(lat)))
        if s.not_run:
            body.append(f"### {s.name}: not run\n\n{s.not_run}\n")
    body.append(f"Machine: {_machine(card)}.\n")
    if card.plots:
        body.append("## Plots\n\n" + "".join(f"![{p.rsplit('/', 1)[-1]}]({p})\n\n" for p in card.plots))
    body.append("## Provenance\n\n`provenance.intoto.json` is an in-toto Statement v1 (SLSA provenance v1 predicate) "
                "whose subjects are every other file here with its sha256, and whose predicate holds the recipe, "
                "toolchain.lock, the source model's content hash, the package versions and the machine. Check a "
                "downloaded copy with `toolchain verify FOLDER`. The build's own records are `manifest.json`, "
                "`report.md`, `report.json` and `toolchain.lock`.\n")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return str(ModelCard(content))
