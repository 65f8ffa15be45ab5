"""One interface over a PyTorch model folder (run eagerly, or compiled as its `inductor` settings
say), an ONNX folder and an AOTInductor package, for validate, benchmark and select."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from toolchain.architectures import VISION_TASKS
from toolchain.planning.shapes import describe_shapes, shape_problem
from toolchain.execution.runtime import compiled, models, onnx_io

DTYPE_OF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUT_BY_TASK = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits",
                  "text-generation": "logits", "image-feature-extraction": "last_hidden_state",
                  "image-classification": "logits"}


class TorchRunner:
    runtime = "PyTorch"

    def __init__(self, folder: Path, device: str = "cpu", cache_dir: Path | None = None):
        self.device = device
        self.model, self.tokenizer, self.meta = models.load_artifact(folder, device)
        self.task = self.meta.get("task", "feature-extraction")
        self.output = OUTPUT_BY_TASK[self.task]
        self.dtype = self.meta.get("dtype", "float32")
        # an `inductor` artifact runs compiled, here as in the compile stage; compiling happens on
        # the first call of each shape (benchmark times that call on its own)
        self.compile = self.meta.get("compile")
        self.compiles = bool(self.compile)
        self._fn = self.model
        if self.compile:
            compiled.use_store_cache(cache_dir)
            self._fn = compiled.compile_model(self.model, self.compile)

    def describe(self) -> str:
        attn = getattr(self.model.config, "_attn_implementation", None)
        if self.meta.get("sdpa_kernel"):
            attn += f", {self.meta['sdpa_kernel']} kernel only"
        extra = ", BetterTransformer" if self.meta.get("bettertransformer") else ""
        q = self.meta.get("quantization")
        if q:
            extra += f", bitsandbytes {q['scheme']}"
        c = self.compile
        if c:
            extra += (f", torch.compile mode {c['mode']}" + (", fullgraph" if c["fullgraph"] else "")
                      + (", CUDA graphs captured by toolchain" if compiled.manual_graphs(c) else "")
                      + (", frozen weights" if c.get("freezing") else "")
                      + "".join(f", {k}" for k in sorted(c.get("options") or {}))
                      + ", " + describe_shapes(c))
        return f"PyTorch {self.dtype} ({attn} attention{extra}) on {self.device}"

    def compile_stats(self) -> dict | None:
        return compiled.counters() if self.compile else None

    def flops(self, batch: int, seq: int) -> float:
        """Forward FLOPs: 2 x non-embedding parameters x tokens, plus attention scores and values
        (4 x batch x seq^2 x hidden per layer, halved for causal models); padding counted as work."""
        cfg = self.model.config
        if getattr(self.model, "is_quantized", False) or self.vision:  # counted for text tokens only
            return 0.0
        params = sum(p.numel() for n, p in self.model.named_parameters() if "embed" not in n)
        hidden = getattr(cfg, "hidden_size", 0)
        layers = getattr(cfg, "num_hidden_layers", 0)
        attn = 4 * batch * seq * seq * hidden * layers * (0.5 if self.task == "text-generation" else 1.0)
        return 2.0 * params * batch * seq + attn

    def release(self) -> None:
        """Drop what `call` prepared and return cached GPU memory between measurements."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _run(self, **kwargs):
        with torch.no_grad(), models.sdpa_context(self.meta):
            return self._fn(**kwargs)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        b, s = input_ids.shape
        shape = self._static_shape()
        if shape and b <= shape[0] and s <= shape[1]:  # as a user of a one-shape compile feeds it: padded
            input_ids, attention_mask = compiled.pad_to(input_ids, attention_mask, *shape)
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        kwargs = {"use_cache": False} if self.task == "text-generation" else {}
        out = self._run(input_ids=ids, attention_mask=mask, **kwargs)
        value = getattr(out, self.output)[:b]
        return {self.output: (value[:, :s] if value.ndim >= 3 else value).float().cpu().numpy()}

    @property
    def vision(self) -> bool:
        return self.task in VISION_TASKS

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    def forward_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """A vision model's output for (batch, channels, size, size) pixel values."""
        pixels = torch.from_numpy(pixel_values).to(self.device, DTYPE_OF[self.dtype])
        out = self._run(pixel_values=pixels)
        return {self.output: getattr(out, self.output).float().cpu().numpy()}

    def call_pixels(self, pixel_values: np.ndarray):
        """Prepared callable for timing a vision model (pixels already on the device)."""
        pixels = torch.from_numpy(pixel_values).to(self.device, DTYPE_OF[self.dtype])
        return lambda: self._run(pixel_values=pixels)

    def _static_shape(self) -> tuple[int, int] | None:
        """(batch, sequence) of a static `inductor` compile: smaller inputs are padded up to it, so the
        compiled graph serves them instead of a recompile per shape (past torch.compile's limit)."""
        c = self.compile
        if not c or c["dynamic"]:
            return None
        return c["shape"]["batch"], c["shape"]["sequence"]

    def call(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Prepared callable for timing (inputs already on the device)."""
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        kwargs = {"use_cache": False} if self.task == "text-generation" else {}
        if compiled.manual_graphs(self.compile):  # the graph replays; `forward` runs the same compiled code
            with torch.no_grad(), models.sdpa_context(self.meta):
                return compiled.CapturedCall(self._fn, dict(input_ids=ids, attention_mask=mask, **kwargs),
                                             self.device)
        return lambda: self._run(input_ids=ids, attention_mask=mask, **kwargs)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _static_decoder(self, tokens: int):
        """For a compiled decoder: toolchain's greedy loop over a static KV cache with the compile
        settings applied to the one-token step (CUDA graphs under reduce-overhead), one per
        128-position bucket so that prompts of other lengths reuse the compiled step."""
        from toolchain.execution.runtime.decode import StaticDecoder

        limit = getattr(self.model.config, "max_position_embeddings", None) or tokens
        max_len = min(-(-tokens // 128) * 128, max(limit, tokens))
        decoders = self.__dict__.setdefault("_decoders", {})
        if max_len not in decoders:
            c = self.compile
            decoders[max_len] = StaticDecoder(self.model, max_len, c["mode"], c["fullgraph"], c.get("graphs", "trees"),
                                              bool(c.get("freezing")), c.get("options"))
        return decoders[max_len]

    def decode_timer(self) -> str:
        if self.compile and self.device.startswith("cuda"):
            return "CUDA events between tokens (toolchain's static-cache loop, no host sync per token)"
        return "host clock around each step" + (", synchronised" if self.device.startswith("cuda") else "")

    @torch.no_grad()
    def decode_steps(self, prompt_ids: np.ndarray, steps: int) -> list[int]:
        """Nanoseconds of each single-token decode step after a prefill (KV cache, greedy)."""
        import time

        if self.compile:  # the compiled step over a static cache, as a user of the artifact runs it
            ids = torch.from_numpy(prompt_ids.reshape(1, -1))
            with models.sdpa_context(self.meta):
                gen = self._static_decoder(ids.shape[1] + steps + 1).generate(ids, steps + 1)
            return [int(s * 1e9) for s in gen.step_s]
        ids = torch.from_numpy(prompt_ids.reshape(1, -1)).to(self.device)
        out = self._run(input_ids=ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter_ns()
            out = self._run(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            self.sync()
            times.append(time.perf_counter_ns() - t0)
        return times

    @torch.no_grad()
    def greedy(self, prompt_ids: np.ndarray, new_tokens: int, eos: set[int]) -> list[int]:
        if self.compile:  # generate() would run the uncompiled model: the compiled step decodes
            ids = torch.from_numpy(prompt_ids.reshape(1, -1))
            with models.sdpa_context(self.meta):
                gen = self._static_decoder(ids.shape[1] + new_tokens).generate(ids, new_tokens)
            out = []
            for tok in gen.tokens[0]:  # up to and including the first end-of-sequence, like generate()
                out.append(tok)
                if tok in eos:
                    break
            return out
        ids = torch.from_numpy(prompt_ids.reshape(1, -1)).to(self.device)
        with models.sdpa_context(self.meta):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=sorted(eos) or None,
                                      pad_token_id=sorted(eos)[0] if eos else 0)
        return out[0, ids.shape[1]:].tolist()


class OrtRunner(onnx_io.OrtModel):
    runtime = "onnxruntime"

    def __init__(self, folder: Path, device: str = "cpu", provider: str | None = None, cache_dir=None):
        super().__init__(folder, device, provider, cache_dir)
        self.task = self.meta.get("task", "feature-extraction")
        self.output = OUTPUT_BY_TASK[self.task]
        self.dtype = self.meta.get("dtype", "float32")
        self._tokenizer = False  # loaded on first use: only a reference's is needed

    @property
    def tokenizer(self):
        """The tokenizer the export's folder carries (None: it has none)."""
        if self._tokenizer is False:
            self._tokenizer = models.folder_tokenizer(self.folder)
        return self._tokenizer

    def describe(self) -> str:
        extra = ", IO binding" if self.io_binding else ""
        if self.cuda_graph:
            extra += ", CUDA graph"
        if self.static_shape:
            extra += ", fixed shape " + "x".join(str(v) for v in self.static_shape.values())
        o = self.meta.get("optimized") or {}
        opt = (", fused GroupQueryAttention" if o.get("attention") == "gqa"
               else f", optimized {o['level']}" if o else "")
        q = self.meta.get("quantization")
        if q:
            opt += f", quantized {q['scheme']}" + (f" (block {q['block_size']})" if q.get("block_size") else "")
        return f"ONNX {self.dtype} ({self.graph.get('exporter')} exporter, opset {self.graph.get('opset')}{opt}) on " \
               f"onnxruntime {self.sess.get_providers()[0]}{extra}"

    @property
    def vision(self) -> bool:
        return self.task in VISION_TASKS

    @property
    def image_size(self) -> int:
        return int(self.graph["image_size"])

    def _pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        kind = self.sess.get_inputs()[0].type
        return {"pixel_values": pixel_values.astype(np.float16 if kind == "tensor(float16)" else np.float32)}

    def forward_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        values = self.sess.run(None, self._pixels(pixel_values))
        return dict(zip([o.name for o in self.sess.get_outputs()], values))

    def call_pixels(self, pixel_values: np.ndarray):
        return self._call_feed(self._pixels(pixel_values))

    def call(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        feed = self.feed(*self.padded(input_ids, attention_mask))
        if self.cuda_graph:  # the inputs copied into the captured graph's buffers once; each call replays
            self._fixed_run(feed)
            return lambda: self._fixed_run(None)
        return self._call_feed(feed)

    def _call_feed(self, feed: dict):
        if not self.io_binding:
            return lambda: self.sess.run(None, feed)
        # inputs copied to the device once, outputs left there: times the model, not PCIe copies
        import onnxruntime as ort

        dev = "cuda"
        idx = int(self.device.split(":")[1]) if ":" in self.device else 0
        binding = self.sess.io_binding()
        self._keep = [ort.OrtValue.ortvalue_from_numpy(v, dev, idx) for v in feed.values()]
        for name, value in zip(feed, self._keep):
            binding.bind_ortvalue_input(name, value)
        for out in self.sess.get_outputs():
            binding.bind_output(out.name, dev, idx)
        self._binding = binding

        def fn():
            self.sess.run_with_iobinding(binding)
        return fn

    def release(self) -> None:
        self._binding = None
        self._keep = []

    def sync(self) -> None:
        # sess.run returns host arrays (already synchronised); with IO binding, wait for the device
        if self._fixed is not None:
            self._fixed[0].synchronize_outputs()
        elif getattr(self, "_binding", None) is not None:
            self._binding.synchronize_outputs()


class AotiRunner:
    """An AOTInductor package, run the way a user runs it: torch alone, keyword tensors."""

    runtime = "AOTInductor"
    compiles = False  # compiled when it was built; loading it is timed instead

    def __init__(self, folder: Path, device: str = "cpu"):
        self.folder, self.device = Path(folder), device
        self.meta = models.read_meta(self.folder)
        self.compile = self.meta["compile"]
        self.task = self.meta.get("task", "feature-extraction")
        self.output = self.meta["outputs"][0]
        self.dtype = self.meta.get("dtype", "float32")
        self.tokenizer = None
        t0 = time.perf_counter()
        self.model = compiled.load_package(self.folder, device)
        self.load_seconds = time.perf_counter() - t0

    def describe(self) -> str:
        built = self.meta.get("built_with", {})
        return (f"AOTInductor {self.dtype} package ({describe_shapes(self.compile)}; torch {built.get('torch')}, "
                f"{built.get('cxx') or 'compiler unknown'}) on {self.device}")

    def _feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, pad: bool) -> dict:
        why = shape_problem(self.compile, *input_ids.shape, pad=pad)
        if why:
            raise ValueError(f"input of shape {tuple(input_ids.shape)}: {why}")
        if pad and not self.compile["dynamic"]:
            shape = self.compile["shape"]
            input_ids, attention_mask = compiled.pad_to(input_ids, attention_mask, shape["batch"], shape["sequence"])
        return compiled.package_inputs(self.meta, input_ids, attention_mask, self.device)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for the given rows and positions (a static package's padding is cut off again)."""
        b, s = input_ids.shape
        out = self.model(**self._feed(input_ids, attention_mask, pad=True))
        return {self.output: out[:b, :s].float().cpu().numpy()}

    def call(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Prepared callable for timing: exactly the shape asked for, never padded."""
        feed = self._feed(input_ids, attention_mask, pad=False)
        return lambda: self.model(**feed)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def greedy(self, prompt_ids: np.ndarray, new_tokens: int, eos: set[int]) -> list[int]:
        return compiled.greedy_by_forward(self.forward, self.output, prompt_ids, new_tokens, eos)


def open_runner(folder: Path, artifact: str, device: str = "cpu", provider: str | None = None, cache_dir=None):
    if artifact == "onnx-model":
        return OrtRunner(folder, device, provider, cache_dir)
    if artifact == "aoti-package":
        return AotiRunner(folder, device)
    return TorchRunner(folder, device, cache_dir)


def eos_ids(folder: Path) -> set[int]:
    """EOS token ids from generation_config.json / config.json."""
    import json

    for name in ("generation_config.json", "config.json"):
        p = Path(folder) / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos if isinstance(eos, list) else [eos])
    return set()
