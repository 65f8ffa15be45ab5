"""ONNX export of transformers models (torch.onnx.export) and onnxruntime sessions around them.

Exported graphs take plain tensors: input_ids, attention_mask (+ token_type_ids for BERT-like
encoders; + position_ids and past_key_values.N.key/value with a KV cache) and return
last_hidden_state | logits (+ present.N.key/value).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from toolchain.planning.artifacts import EXPORT_EXAMPLE

ONNX_FILE = "model.onnx"


def _uses_token_type_ids(model) -> bool:
    import inspect

    # the signature, not forward.__code__: transformers 5 wraps forward in decorators whose code
    # object has only *args/**kwargs, which hid token_type_ids from the export
    return getattr(model.config, "type_vocab_size", 0) > 0 and \
        "token_type_ids" in inspect.signature(model.forward).parameters


def kv_layout(config) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "kv_heads": getattr(config, "num_key_value_heads", heads),
            "head_dim": head_dim}


class _Encoder(torch.nn.Module):
    def __init__(self, model, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return getattr(out, self.output)


SENTENCE_EMBEDDING = "sentence_embedding"


def pool(hidden, mask, mode: str, normalize: bool):
    """sentence-transformers' pooling of (batch, seq, hidden) over the real tokens of `mask`:
    mean (sum / count of real tokens), cls (the first token), max (padding set to -1e9 first);
    then L2 normalisation (x / max(|x|, 1e-12)) if asked."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        out = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(1).values
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.nn.functional.normalize(out, p=2.0, dim=1) if normalize else out


class _PooledEncoder(torch.nn.Module):
    """last_hidden_state and its pooled sentence embedding, in one graph."""

    def __init__(self, model, pooling: dict):
        super().__init__()
        self.model, self.mode, self.normalize = model, pooling["mode"], bool(pooling["normalize"])

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return hidden, pool(hidden, attention_mask, self.mode, self.normalize)


class _Vision(torch.nn.Module):
    """A vision encoder (ViT-style): pixel_values in, last_hidden_state or logits out."""

    def __init__(self, model, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixel_values):
        return getattr(self.model(pixel_values=pixel_values), self.output)


class _Decoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _DecoderWithPast(torch.nn.Module):
    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export(model, task: str, kv_cache: bool, exporter: str, opset: int, dynamic: bool, external_data: str,
           out_dir: Path, log=print, pooling: dict | None = None, example: dict | None = None) -> dict:
    """Export `model` into out_dir/model.onnx; returns the graph description saved in toolchain.json.
    `pooling` ({"mode", "normalize"}, feature-extraction only) adds a `sentence_embedding` output.
    `example` ({"batch", "sequence"}) is the traced shape, the graph's only one when not `dynamic`."""
    model.eval()
    example = {**EXPORT_EXAMPLE, **(example or {})}
    if task in ("image-feature-extraction", "image-classification"):
        return _export_vision(model, task, exporter, opset, dynamic, external_data, out_dir, example["batch"])
    batch, seq, past_len = example["batch"], example["sequence"], 4
    ids = torch.randint(5, min(model.config.vocab_size, 1000), (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    args: list = [ids, mask]
    names = ["input_ids", "attention_mask"]
    if task == "text-generation":
        if kv_cache:
            lay = kv_layout(model.config)
            dtype = next(model.parameters()).dtype
            wrapper = _DecoderWithPast(model, lay["layers"])
            mask = torch.ones(batch, past_len + seq, dtype=torch.long)
            pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
            past = [torch.randn(batch, lay["kv_heads"], past_len, lay["head_dim"], dtype=dtype)
                    for _ in range(2 * lay["layers"])]
            args = [ids, mask, pos, *past]
            names = ["input_ids", "attention_mask", "position_ids"] + [
                f"past_key_values.{i}.{kv}" for i in range(lay["layers"]) for kv in ("key", "value")]
            outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(lay["layers"]) for kv in ("key", "value")]
        else:
            wrapper, outputs = _Decoder(model), ["logits"]
    else:
        output = "last_hidden_state" if task == "feature-extraction" else "logits"
        wrapper, outputs = _Encoder(model, output), [output]
        if pooling:
            wrapper, outputs = _PooledEncoder(model, pooling), [output, SENTENCE_EMBEDDING]
        if _uses_token_type_ids(model):
            args.append(torch.zeros(batch, seq, dtype=torch.long))
            names.append("token_type_ids")

    wrapper.eval()  # a new Module starts in training mode (the model is in eval already): no warning per export
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = external_data == "always" or (external_data == "auto" and size > 1.8 * 2**30)
    path = out_dir / ONNX_FILE
    kwargs = dict(input_names=names, output_names=outputs, opset_version=opset)
    if exporter == "dynamo":
        dynamic_shapes = None
        if dynamic:
            b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
            if task == "text-generation" and kv_cache:
                p, t = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
                dynamic_shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s},
                                  tuple({0: b, 2: p} for _ in args[3:]))
            else:
                dynamic_shapes = tuple({0: b, 1: s} for _ in args)
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(args), str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                              external_data=use_external, **kwargs)
    else:
        axes = None
        if dynamic:
            axes = {n: {0: "batch", 1: "sequence"} for n in names[:3]}
            if kv_cache:
                axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
                axes.update({n: {0: "batch", 2: "past_sequence"} for n in names[3:]})
                axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
            axes.update({outputs[0]: {0: "batch", 1: "sequence"}})
            if pooling:
                axes[SENTENCE_EMBEDDING] = {0: "batch"}
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(args), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
        if use_external:
            import onnx

            m = onnx.load(str(path))
            onnx.save_model(m, str(path), save_as_external_data=True, location=ONNX_FILE + ".data")
    return {"file": ONNX_FILE, "inputs": names, "outputs": outputs, "kv_cache": bool(kv_cache),
            "external_data": use_external, "exporter": exporter, "opset": opset,
            **({"pooling": pooling} if pooling else {}),
            **(kv_layout(model.config) if kv_cache else {})}


def _export_vision(model, task: str, exporter: str, opset: int, dynamic: bool, external_data: str,
                   out_dir: Path, batch: int) -> dict:
    """A vision encoder: input pixel_values (batch, channels, size, size), the batch axis dynamic
    (the image size is the model's); output last_hidden_state or logits."""
    cfg = model.config
    output = "last_hidden_state" if task == "image-feature-extraction" else "logits"
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch, getattr(cfg, "num_channels", 3), cfg.image_size, cfg.image_size, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = external_data == "always" or (external_data == "auto" and size > 2 * 1024**3)
    path = out_dir / ONNX_FILE
    kwargs = dict(input_names=["pixel_values"], output_names=[output], opset_version=opset)
    wrapper = _Vision(model, output)
    with torch.no_grad():
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            torch.onnx.export(wrapper, (pixels,), str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=use_external, **kwargs)
        else:
            axes = {"pixel_values": {0: "batch"}, output: {0: "batch"}} if dynamic else None
            torch.onnx.export(wrapper, (pixels,), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
            if use_external:
                import onnx

                onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True,
                                location=ONNX_FILE + ".data")
    return {"file": ONNX_FILE, "inputs": ["pixel_values"], "outputs": [output], "kv_cache": False,
            "external_data": use_external, "exporter": exporter, "opset": opset,
            "image_size": int(cfg.image_size), "num_channels": int(getattr(cfg, "num_channels", 3))}


# onnxruntime-genai's model builder writes the decoder from the checkpoint's weights with
# onnxruntime's fused operators (packed QKV attention or GroupQueryAttention, RotaryEmbedding,
# SkipSimplifiedLayerNormalization): about 12 nodes a layer where a traced export has about 60.
# It is run as a separate process (it prints freely and keeps module state) on the saved checkpoint.
def export_genai(src: Path, precision: str, provider: str, out_dir: Path, work: Path, log=print) -> dict:
    """Build a decoder with a KV cache from the checkpoint folder `src` into out_dir/model.onnx
    with onnxruntime-genai's model builder; returns the graph description saved in toolchain.json.
    The builder's genai_config.json is kept, so the folder also runs under onnxruntime-genai."""
    import os
    import subprocess
    import sys

    cache = work / "genai-cache"
    built = work / "genai-out"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(built),
           "-p", precision, "-e", provider, "-c", str(cache)]
    log("running: " + " ".join(cmd))
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log(run.stdout[-20000:])
    log(run.stderr[-20000:])
    if run.returncode != 0 or not (built / ONNX_FILE).is_file():
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"onnxruntime-genai's model builder failed (exit {run.returncode}):\n{tail}")
    for f in built.iterdir():
        if f.name.startswith(ONNX_FILE) or f.name == "genai_config.json":
            f.replace(out_dir / f.name)
    return describe_built(src, out_dir, "genai", f"the model builder ({precision} on {provider})", kv_cache=True)


def describe_built(src: Path, out_dir: Path, exporter: str, who: str, kv_cache: bool, output: str = "logits") -> dict:
    """The graph description (toolchain.json's `graph`) of out_dir/model.onnx written by another
    tool (onnxruntime-genai's builder, Optimum's exporter), read from the graph itself; raises
    RuntimeError for a graph that onnxruntime could not load or that lacks what its task needs."""
    import collections
    from types import SimpleNamespace

    import onnx

    m = onnx.load(str(out_dir / ONNX_FILE), load_external_data=False)
    names = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    outputs = [o.name for o in m.graph.output]
    made = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    missing = [o for o in outputs if o not in made]
    if missing:  # onnxruntime would refuse to load it; never let such a graph into the store
        raise RuntimeError(f"{who} wrote a graph whose outputs {missing[:3]} no node produces; "
                           "onnxruntime cannot load it")
    if kv_cache != any(n.startswith("past_key_values.") for n in names) or output not in outputs:
        raise RuntimeError(f"{who} wrote a graph with inputs {names[:4]} and outputs {outputs[:2]}; expected "
                           f"{'' if kv_cache else 'no '}past_key_values.* inputs and a {output} output")
    config = json.loads((src / "config.json").read_text())
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    op_types = collections.Counter(n.op_type for n in m.graph.node)
    external = sorted(f.name for f in out_dir.iterdir() if f.name.startswith(ONNX_FILE) and f.name != ONNX_FILE)
    return {"file": ONNX_FILE, "inputs": names, "outputs": outputs, "kv_cache": kv_cache,
            "external_data": bool(external), "exporter": exporter, "opset": opset,
            "nodes": len(m.graph.node), "op_types": dict(op_types.most_common()),
            **(kv_layout(SimpleNamespace(**config)) if kv_cache else {})}


def export_optimum(src: Path, task: str, kv_cache: bool, opset: int, out_dir: Path, work: Path) -> dict:
    """Export the checkpoint folder `src` with optimum-onnx's `main_export` into out_dir/model.onnx;
    the graph description saved in toolchain.json. Runs in the `optimum-onnx` lane's worker."""
    from toolchain.execution.runtime import optimum_lane

    built = work / "optimum-out"
    # optimum's task names: a decoder with a KV cache is `text-generation-with-past`
    done = optimum_lane.export(str(src), str(built), task + ("-with-past" if kv_cache else ""), opset, work)
    if not (built / ONNX_FILE).is_file():
        raise RuntimeError(f"optimum's main_export wrote no {ONNX_FILE} (it wrote {sorted(f.name for f in built.iterdir())})")
    for f in built.iterdir():  # the graph and its external data; config and tokenizer come from `src`
        if f.name.startswith(ONNX_FILE):
            f.replace(out_dir / f.name)
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    graph = describe_built(src, out_dir, "optimum", "optimum's main_export", kv_cache, output)
    graph["lane"] = {"name": "optimum-onnx", **done}
    return graph


def _ort():
    import onnxruntime

    return onnxruntime


class ProviderMismatch(RuntimeError):
    """onnxruntime would run the session on another provider than the one asked for."""


class ProviderUnavailable(RuntimeError):
    """The provider cannot run on this machine at all (a `not run` check, not a failure)."""


def session(path: Path, provider: str = "cpu", device: str = "cpu", options: dict | None = None,
            cache_dir: Path | None = None, precheck: bool = True):
    """An InferenceSession on exactly the provider asked for. onnxruntime falls back to the CPU
    silently when a provider cannot load, so we compare what it took with what we asked.
    `precheck=False` skips our static checks of the machine and lets onnxruntime itself try the
    provider (benchmarks/gpu/run.sh proves so that its silent fallback is caught)."""
    from toolchain import environment

    ask_directly = not precheck
    why = None if ask_directly else environment.provider_status(provider)
    if why:
        raise ProviderUnavailable(why)
    ort = _ort()
    wanted = environment.PROVIDER_NAMES[provider]
    if wanted not in ort.get_available_providers() and not ask_directly:
        raise ProviderUnavailable(f"onnxruntime here has no {wanted} (available: "
                                  f"{', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    provider_options = dict(options or {})
    if provider in ("cuda", "tensorrt", "rocm"):
        provider_options.setdefault("device_id", int(device.split(":")[1]) if ":" in device else 0)
    if provider == "tensorrt" and cache_dir is not None:
        for kind in ("engine", "timing"):
            folder = Path(cache_dir) / "tensorrt" / kind
            folder.mkdir(parents=True, exist_ok=True)
            provider_options.setdefault(f"trt_{kind}_cache_enable", True)
            provider_options.setdefault(f"trt_{kind}_cache_path", str(folder))
    providers = [(wanted, {k: str(v) if isinstance(v, bool) else v for k, v in provider_options.items()})]
    if provider == "tensorrt":  # TensorRT hands nodes it cannot take to CUDA, as intended
        providers.append(("CUDAExecutionProvider", {"device_id": provider_options["device_id"]}))
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ProviderMismatch(f"onnxruntime could not create a {wanted} session: {exc}") from None
    return verify_provider(sess, wanted)


def verify_provider(sess, wanted: str):
    """Refuse a session whose first provider is not the one asked for (onnxruntime only warns)."""
    if sess.get_providers()[0] != wanted:
        raise ProviderMismatch(f"asked onnxruntime for {wanted} but the session runs on {sess.get_providers()[0]} "
                               f"(providers taken: {', '.join(sess.get_providers())}); refusing the silent fallback")
    return sess


class OrtModel:
    """Runs an exported folder with numpy inputs; mirrors what the PyTorch side computes."""

    def __init__(self, folder: Path, device: str = "cpu", provider: str | None = None, cache_dir=None):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "toolchain.json").read_text())
        self.graph = self.meta["graph"]
        target = self.meta.get("target", {})  # how to run on the provider the export targets (a fact)
        targeted = self.meta.get("provider") or "cpu"
        self.provider = provider or targeted
        options = dict(target.get("provider_options", {})) if self.provider == targeted else {}
        self.io_binding = self.provider in ("cuda", "tensorrt", "rocm") and target.get("io_binding", True)
        # a fixed-shape graph (`dynamic_axes: false`) takes smaller inputs padded up to its one shape
        self.static_shape = self.meta.get("static_shape")
        # onnxruntime CUDA graphs: captured on the third run, then replayed from the addresses bound then
        self.cuda_graph = bool(target.get("cuda_graph")) and self.provider == "cuda"
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        self._fixed = None  # the CUDA graph's binding: (binding, {input: OrtValue}, output names, outputs)
        self.device = device
        self.sess = session(self.folder / self.graph["file"], self.provider, device, options, cache_dir)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        past_types = [i.type for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.float_type = np.float16 if past_types and past_types[0] == "tensor(float16)" else np.float32

    def _past(self, batch: int):
        g = self.graph
        return {n: np.zeros((batch, g["kv_heads"], 0, g["head_dim"]), dtype=self.float_type)
                for n in self.inputs if n.startswith("past_key_values.")}

    def feed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for one full forward pass (empty past), limited to what the graph takes."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        feed["position_ids"] = np.clip(np.cumsum(feed["attention_mask"], axis=1) - 1, 0, None)
        if self.graph.get("kv_cache"):
            feed.update(self._past(input_ids.shape[0]))
        return {k: v for k, v in feed.items() if k in self.inputs}

    def padded(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """A fixed-shape graph's inputs: right-padded (masked) up to its shape, as a user of such a
        graph feeds it; other graphs' inputs as they are."""
        shape = self.static_shape
        if not shape or "sequence" not in shape:
            return input_ids, attention_mask
        from toolchain.execution.runtime.compiled import pad_to

        b, s = input_ids.shape
        if b > shape["batch"] or s > shape["sequence"]:
            raise ValueError(f"input of batch {b} x sequence {s} does not fit the graph's fixed shape "
                             f"(batch {shape['batch']}, sequence {shape['sequence']}): it was exported with "
                             "`dynamic_axes: false`")
        return pad_to(input_ids, attention_mask, shape["batch"], shape["sequence"])

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        b, s = input_ids.shape
        feed = self.feed(*self.padded(input_ids, attention_mask))
        if self.cuda_graph:
            self._fixed_run(feed)
            binding, _, names, _ = self._fixed
            values = [v.numpy() for v in binding.get_outputs()]
        else:
            values = self.sess.run(None, feed)
            names = [o.name for o in self.sess.get_outputs()]
        if self.static_shape and "sequence" in self.static_shape:  # the padding cut off again
            values = [v[:b, :s] if v.ndim >= 3 else v[:b] for v in values]
        return dict(zip(names, values))

    def _fixed_run(self, feed: dict | None) -> None:
        """Run the CUDA-graph session through its one binding: `feed` (host arrays of the graph's
        shape) is copied into the bound inputs first (None: run on what they hold). The first run
        lets onnxruntime allocate the outputs, which are then bound by address for every later run:
        onnxruntime captures on a later run and replays into exactly those buffers."""
        ort = _ort()
        dev, idx = self._device()
        if self._fixed is None:
            binding = self.sess.io_binding()
            inputs = {n: ort.OrtValue.ortvalue_from_numpy(v, dev, idx) for n, v in feed.items()}
            for n, v in inputs.items():
                binding.bind_ortvalue_input(n, v)
            names = [o.name for o in self.sess.get_outputs()]
            for n in names:
                binding.bind_output(n, dev, idx)
            self.sess.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            binding.clear_binding_outputs()
            for n, v in zip(names, outputs):
                binding.bind_ortvalue_output(n, v)
            self._fixed = (binding, inputs, names, outputs)  # the OrtValues kept alive: their addresses are bound
            return
        binding, inputs = self._fixed[:2]
        for n, v in (feed or {}).items():
            if v.shape != tuple(inputs[n].shape()):
                raise ValueError(f"input {n} of shape {v.shape} for a CUDA graph captured at {inputs[n].shape()}")
            inputs[n].update_inplace(np.ascontiguousarray(v))
        self.sess.run_with_iobinding(binding)

    def decode_steps(self, prompt_ids: np.ndarray, steps: int) -> list[int]:
        """Nanoseconds of each single-token decode step after a prefill (KV cache, greedy)."""
        times: list[int] = []
        self.greedy(prompt_ids, steps + 1, eos=set(), step_times=times)
        return times[1:]

    def greedy(self, prompt_ids: np.ndarray, new_tokens: int, eos: set[int], step_times=None) -> list[int]:
        """Greedy decoding of one prompt (batch 1), stopping at an EOS token like `generate` does."""
        import time

        ids = prompt_ids.reshape(1, -1).astype(np.int64)
        out: list[int] = []
        if not self.graph.get("kv_cache"):
            for _ in range(new_tokens):
                logits = self.forward(ids, np.ones_like(ids))["logits"]
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                if tok in eos:
                    break
                ids = np.concatenate([ids, [[tok]]], axis=1)
            return out
        if self.io_binding:
            return self._greedy_bound(ids, new_tokens, eos, step_times)
        past = self._past(1)
        step_ids, total = ids, ids.shape[1]
        pos = np.arange(total, dtype=np.int64)[None]
        for _ in range(new_tokens):
            feed = {"input_ids": step_ids, "attention_mask": np.ones((1, total), dtype=np.int64),
                    "position_ids": pos, **past}
            feed = {k: v for k, v in feed.items() if k in self.inputs}
            t0 = time.perf_counter_ns()
            values = self.sess.run(None, feed)
            if step_times is not None:
                step_times.append(time.perf_counter_ns() - t0)
            names = [o.name for o in self.sess.get_outputs()]
            result = dict(zip(names, values))
            tok = int(result["logits"][0, -1].argmax())
            out.append(tok)
            if tok in eos:
                break
            past = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
            step_ids = np.array([[tok]], dtype=np.int64)
            pos = np.array([[total]], dtype=np.int64)
            total += 1
        return out

    def _device(self) -> tuple[str, int]:
        """onnxruntime's name and index of the device the session's tensors live on."""
        if self.provider in ("cuda", "tensorrt", "rocm"):
            return "cuda", int(self.device.split(":")[1]) if ":" in self.device else 0
        return "cpu", 0

    def _greedy_bound(self, ids: np.ndarray, new_tokens: int, eos: set[int], step_times=None) -> list[int]:
        """The KV-cache loop with IO binding: each step's `present.*` outputs stay where onnxruntime
        put them (on the GPU) and are bound as the next step's `past_key_values.*`, so the cache never
        crosses to the host; only the token, its position and the mask go in, and only the last
        logits row comes out (for the argmax)."""
        import time

        ort = _ort()
        dev, idx = self._device()
        names = [o.name for o in self.sess.get_outputs()]
        logits_at = names.index("logits")
        past = {n: ort.OrtValue.ortvalue_from_numpy(v, dev, idx) for n, v in self._past(1).items()}
        binding = self.sess.io_binding()
        step_ids, total, out = ids, ids.shape[1], []
        pos = np.arange(total, dtype=np.int64)[None]
        for _ in range(new_tokens):
            host = {"input_ids": step_ids, "attention_mask": np.ones((1, total), dtype=np.int64), "position_ids": pos}
            keep = {n: ort.OrtValue.ortvalue_from_numpy(v, dev, idx) for n, v in host.items() if n in self.inputs}
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in {**keep, **past}.items():
                binding.bind_ortvalue_input(name, value)
            for name in names:
                binding.bind_output(name, dev, idx)
            t0 = time.perf_counter_ns()
            self.sess.run_with_iobinding(binding)
            values = binding.get_outputs()
            tok = int(values[logits_at].numpy()[0, -1].argmax())  # the copy to the host also waits for the step
            if step_times is not None:
                step_times.append(time.perf_counter_ns() - t0)
            out.append(tok)
            if tok in eos:
                break
            past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, values)
                    if n.startswith("present.")}
            step_ids = np.array([[tok]], dtype=np.int64)
            pos = np.array([[total]], dtype=np.int64)
            total += 1
        return out
