"""Encoder-decoder (seq2seq) models: ONNX export as two graphs, runners for the ONNX folder and the
PyTorch model with one interface, and the work of `validate` and `benchmark` on them.

The folder holds `encoder_model.onnx` (input_ids + attention_mask, or Whisper's input_features ->
last_hidden_state) and `decoder_model.onnx` (decoder_input_ids, encoder_hidden_states,
[encoder_attention_mask], past_key_values.N.key/value of the decoder's self-attention -> logits,
present.N.key/value). toolchain.json's `graph` names both with their inputs, the cache layout and the
generation settings the greedy loop applies.

Cross-attention keys/values are recomputed from encoder_hidden_states at every decode step instead
of being passed as past inputs: one decoder graph then serves the first step (empty past) and every
later one, with no second "decoder without past" graph and no cross-attention cache to carry through
the loop. The cost is the cross-attention K/V projection of the encoder states per token (2 x layers
x encoder_length x d_model^2 multiply-adds), which the benchmark's per-token latency includes.

Exported with the TorchScript exporter (torch.onnx.export(dynamo=False)): the dynamo exporter
(torch 2.13, transformers 5.17) fails on T5's attention in its FX decomposition ("Cannot view a tensor
with shape [s54, s27, 4, 8] ... as (s54, s27, 32)"); tracing the eager model with a padded example
mask and a non-empty past keeps the mask and cache-length arithmetic in the graph (checked by validate
at other batch sizes, lengths and an empty past).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"
SPEECH_TASK = "automatic-speech-recognition"
SAMPLE_RATE = 16000
# generation settings whose logits processors the ONNX greedy loop applies as generate() does
APPLIED = ("decoder_start_token_id", "eos_token_id", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
           "forced_eos_token_id", "min_length", "min_new_tokens", "max_length", "max_new_tokens", "forced_decoder_ids")
# settings that change greedy tokens and that the loop does not apply: a generation config that sets
# them is refused when generation is compared (a different loop must not pass as identical)
NOT_APPLIED = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
               "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "sequence_bias": None,
               "exponential_decay_length_penalty": None, "suppress_tokens_at_begin": None}


def _past_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [n.replace("past_key_values.", "present.") for n in past]


class _Encoder(torch.nn.Module):
    def __init__(self, model, speech: bool):
        super().__init__()
        self.encoder, self.speech = model.get_encoder(), speech

    def forward(self, x, attention_mask=None):
        if self.speech:
            return self.encoder(input_features=x).last_hidden_state
        return self.encoder(input_ids=x, attention_mask=attention_mask).last_hidden_state


class _DecoderWithPast(torch.nn.Module):
    """decoder_input_ids, encoder_hidden_states, [encoder_attention_mask], past self-attention K/V ->
    logits, present self-attention K/V. The cross-attention cache starts empty each call, so the
    model computes cross-attention K/V from encoder_hidden_states (see the module docstring)."""

    def __init__(self, model, layers: int, masked: bool):
        super().__init__()
        self.model, self.layers, self.masked = model, layers, masked

    def forward(self, decoder_input_ids, encoder_hidden_states, *rest):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        mask, past = (rest[0], rest[1:]) if self.masked else (None, rest)
        self_cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            self_cache.update(past[2 * i], past[2 * i + 1], i)
        cache = EncoderDecoderCache(self_cache, DynamicCache(config=self.model.config))
        kwargs = {"attention_mask": mask} if mask is not None else {}
        out = self.model(encoder_outputs=(encoder_hidden_states,), decoder_input_ids=decoder_input_ids,
                         past_key_values=cache, use_cache=True, **kwargs)
        present = []
        for layer in out.past_key_values.self_attention_cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example_encoder_inputs(model, speech: bool, batch: int = 2, seq: int = 9) -> dict:
    """Encoder inputs for tracing: a padded row, so the traced graph keeps the mask's arithmetic
    (an all-ones mask lets transformers drop it, and the trace would then ignore padding)."""
    if speech:
        cfg = model.config
        frames = 2 * cfg.max_source_positions  # Whisper's encoder takes exactly 30 s of features
        return {"input_features": torch.randn(batch, cfg.num_mel_bins, frames, dtype=next(model.parameters()).dtype)}
    ids = torch.randint(5, min(model.config.vocab_size, 1000), (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generation_settings(model) -> dict:
    """The generation settings of the model (its generation config, else its config) that the ONNX
    greedy loop needs: the decoder prompt, end tokens, forced and suppressed tokens, lengths; and the
    settings it cannot apply (`not_applied`), which make a generation comparison refuse."""
    gc = model.generation_config
    get = lambda k: getattr(gc, k, None) if getattr(gc, k, None) is not None else getattr(model.config, k, None)  # noqa: E731
    start = get("decoder_start_token_id")
    if isinstance(start, list):
        start = start[0]
    prompt = [int(start)]
    forced = getattr(gc, "forced_decoder_ids", None) or []
    for index, tok in sorted(forced):  # Whisper's older configs: tokens forced after the start token
        if index == len(prompt) and tok is not None:
            prompt.append(int(tok))
    eos = get("eos_token_id")
    settings = {"decoder_prompt": prompt, "eos_token_id": sorted(set(eos if isinstance(eos, list) else [eos]))
                if eos is not None else [],
                "suppress_tokens": list(getattr(gc, "suppress_tokens", None) or []),
                "begin_suppress_tokens": list(getattr(gc, "begin_suppress_tokens", None) or []),
                "forced_bos_token_id": getattr(gc, "forced_bos_token_id", None),
                "forced_eos_token_id": getattr(gc, "forced_eos_token_id", None),
                "min_length": getattr(gc, "min_length", 0) or 0, "min_new_tokens": getattr(gc, "min_new_tokens", None),
                "max_length": getattr(gc, "max_length", None), "max_new_tokens": getattr(gc, "max_new_tokens", None)}
    not_applied = [k for k, default in NOT_APPLIED.items() if getattr(gc, k, default) not in (default, None, [])]
    if getattr(gc, "is_multilingual", False) and getattr(gc, "lang_to_id", None) and not getattr(gc, "language", None):
        not_applied.append("language detection (a multilingual Whisper without `language`)")
    if getattr(gc, "return_timestamps", False):
        not_applied.append("return_timestamps")
    settings["not_applied"] = not_applied
    return settings


def export(model, task: str, opset: int, external_data: str, out_dir: Path, log=print) -> dict:
    """encoder_model.onnx + decoder_model.onnx in out_dir; returns the graph description for toolchain.json."""
    model.eval()
    speech = task == SPEECH_TASK
    enc_inputs = example_encoder_inputs(model, speech)
    with torch.no_grad():
        hidden = model.get_encoder()(**enc_inputs).last_hidden_state
        ids = torch.randint(5, min(model.config.vocab_size, 1000), (hidden.shape[0], 2))
        mask = enc_inputs.get("attention_mask")
        first = model(encoder_outputs=(hidden,), decoder_input_ids=ids, use_cache=True,
                      **({"attention_mask": mask} if mask is not None else {}))
    layers_kv = first.past_key_values.self_attention_cache.layers
    layers = len(layers_kv)
    _, kv_heads, _, head_dim = layers_kv[0].keys.shape
    past_names, present_names = _past_names(layers)
    dtype = hidden.dtype
    past = [torch.randn(hidden.shape[0], kv_heads, 3, head_dim, dtype=dtype) for _ in past_names]

    enc_names = list(enc_inputs)
    enc_axes = {"input_features": {0: "batch"}} if speech else \
        {n: {0: "batch", 1: "encoder_sequence"} for n in enc_names}
    enc_axes["last_hidden_state"] = {0: "batch", 1: "encoder_sequence"}
    encoder = _Encoder(model, speech).eval()  # a new Module starts in training mode: dropout would be traced
    dec_names = ["decoder_input_ids", "encoder_hidden_states"] + ([] if speech else ["encoder_attention_mask"]) \
        + past_names
    dec_args = (ids, hidden) + (() if speech else (mask,)) + tuple(past)
    dec_axes = {"decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
                "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                "logits": {0: "batch", 1: "decoder_sequence"},
                **{n: {0: "batch", 2: "past_sequence"} for n in past_names},
                **{n: {0: "batch", 2: "total_sequence"} for n in present_names}}
    if not speech:
        dec_axes["encoder_attention_mask"] = {0: "batch", 1: "encoder_sequence"}
    decoder = _DecoderWithPast(model, layers, masked=not speech).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = external_data == "always" or (external_data == "auto" and size > 1.8 * 2**30)
    with torch.no_grad():
        log(f"exporting {ENCODER_FILE}")
        torch.onnx.export(encoder, tuple(enc_inputs.values()), str(out_dir / ENCODER_FILE), dynamo=False,
                          input_names=enc_names, output_names=["last_hidden_state"], dynamic_axes=enc_axes,
                          opset_version=opset)
        log(f"exporting {DECODER_FILE}")
        torch.onnx.export(decoder, dec_args, str(out_dir / DECODER_FILE), dynamo=False, input_names=dec_names,
                          output_names=["logits", *present_names], dynamic_axes=dec_axes, opset_version=opset)
    if use_external:
        import onnx

        for name in (ENCODER_FILE, DECODER_FILE):
            m = onnx.load(str(out_dir / name))
            onnx.save_model(m, str(out_dir / name), save_as_external_data=True, location=name + ".data")
    return {"seq2seq": True, "speech": speech, "exporter": "torchscript", "opset": opset, "external_data": use_external,
            "kv_cache": True, "cross_attention": "recomputed from encoder_hidden_states each step",
            "layers": layers, "kv_heads": int(kv_heads), "head_dim": int(head_dim),
            "graphs": {"encoder": {"file": ENCODER_FILE, "inputs": enc_names, "outputs": ["last_hidden_state"]},
                       "decoder": {"file": DECODER_FILE, "inputs": dec_names,
                                   "outputs": ["logits", *present_names]}},
            "generation": generation_settings(model)}


# -- the greedy loop's logits processors (as generate() applies them with num_beams=1) ----------------
def _process(logits: np.ndarray, gen: dict, prompt_len: int, new: int, max_new: int) -> np.ndarray:
    """`new`: tokens generated so far; generate()'s cur_len is prompt_len + new."""
    logits = logits.astype(np.float64)
    cur, max_length = prompt_len + new, prompt_len + max_new
    eos = gen["eos_token_id"]
    if eos and (cur < gen["min_length"] or (gen.get("min_new_tokens") and new < gen["min_new_tokens"])):
        logits[eos] = -np.inf
    if gen["suppress_tokens"]:
        logits[gen["suppress_tokens"]] = -np.inf
    if new == 0 and gen["begin_suppress_tokens"]:
        logits[gen["begin_suppress_tokens"]] = -np.inf
    if cur == 1 and gen.get("forced_bos_token_id") is not None:
        logits[:] = -np.inf
        logits[gen["forced_bos_token_id"]] = 0
    if cur == max_length - 1 and gen.get("forced_eos_token_id") is not None:
        forced = gen["forced_eos_token_id"]
        logits[:] = -np.inf
        logits[forced if isinstance(forced, int) else forced[0]] = 0
    return logits


def max_new_tokens(gen: dict, asked: int | None) -> int:
    """The generation length: validate's `generate.new_tokens` where the recipe sets it, else the
    generation config's max_new_tokens, else its max_length less the decoder prompt."""
    if asked:
        return asked
    if gen.get("max_new_tokens"):
        return gen["max_new_tokens"]
    return max(1, (gen.get("max_length") or 20) - len(gen["decoder_prompt"]))


class OrtSeq2Seq:
    """An exported encoder-decoder folder on onnxruntime: encode, decoder steps with past, greedy."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, device: str = "cpu", provider: str | None = None, cache_dir=None):
        import json

        from toolchain.execution.runtime import onnx_io

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "toolchain.json").read_text())
        self.graph = self.meta["graph"]
        self.task = self.meta.get("task")
        self.dtype = self.meta.get("dtype", "float32")
        self.provider = provider or self.meta.get("provider") or "cpu"
        options = self.meta.get("target", {}).get("provider_options", {}) if self.provider == self.meta.get(
            "provider") else {}
        self.device = device
        g = self.graph["graphs"]
        self.enc = onnx_io.session(self.folder / g["encoder"]["file"], self.provider, device, options, cache_dir)
        self.dec = onnx_io.session(self.folder / g["decoder"]["file"], self.provider, device, options, cache_dir)
        self.dec_inputs = [i.name for i in self.dec.get_inputs()]
        self.dec_outputs = [o.name for o in self.dec.get_outputs()]
        past_type = next(i.type for i in self.dec.get_inputs() if i.name.startswith("past_key_values."))
        self.float_type = np.float16 if past_type == "tensor(float16)" else np.float32
        self.generation = self.graph["generation"]

    def describe(self) -> str:
        return (f"ONNX {self.dtype} encoder + decoder with past (torchscript exporter, opset {self.graph['opset']}) on "
                f"onnxruntime {self.dec.get_providers()[0]}")

    def encode(self, inputs: dict) -> np.ndarray:
        feed = {k: (v.astype(self.float_type) if k == "input_features" else v.astype(np.int64))
                for k, v in inputs.items()}
        return self.enc.run(None, feed)[0]

    def _empty_past(self, batch: int) -> dict:
        g = self.graph
        return {n: np.zeros((batch, g["kv_heads"], 0, g["head_dim"]), dtype=self.float_type)
                for n in self.dec_inputs if n.startswith("past_key_values.")}

    def _step(self, ids: np.ndarray, hidden: np.ndarray, mask, past: dict):
        feed = {"decoder_input_ids": ids, "encoder_hidden_states": hidden, **past}
        if "encoder_attention_mask" in self.dec_inputs:
            feed["encoder_attention_mask"] = mask.astype(np.int64)
        values = dict(zip(self.dec_outputs, self.dec.run(None, feed)))
        present = {n.replace("present.", "past_key_values."): v for n, v in values.items() if n.startswith("present.")}
        return values["logits"], present

    def greedy(self, inputs: dict, new_tokens: int, step_times: list | None = None) -> list[int]:
        """Greedy tokens after the decoder prompt for one input (batch 1), up to and including the
        first end token, with the generation config's forced and suppressed tokens applied."""
        gen = self.generation
        if gen.get("not_applied"):
            raise ValueError("the ONNX greedy loop does not apply the generation config's "
                             f"{', '.join(gen['not_applied'])}, so its tokens cannot be compared with generate()")
        hidden = self.encode(inputs)
        mask = inputs.get("attention_mask")
        prompt = gen["decoder_prompt"]
        ids = np.asarray([prompt], dtype=np.int64)
        past, out = self._empty_past(1), []
        for k in range(new_tokens):
            t0 = time.perf_counter_ns()
            logits, past = self._step(ids, hidden, mask, past)
            tok = int(_process(logits[0, -1], gen, len(prompt), k, new_tokens).argmax())
            if step_times is not None:
                step_times.append(time.perf_counter_ns() - t0)
            out.append(tok)
            if tok in gen["eos_token_id"]:
                break
            ids = np.asarray([[tok]], dtype=np.int64)
        return out

    def decode_steps(self, inputs: dict, steps: int) -> list[int]:
        """Nanoseconds of each single-token decoder step (past of the steps before), greedy, no end token."""
        hidden = self.encode(inputs)
        mask = inputs.get("attention_mask")
        ids = np.asarray([self.generation["decoder_prompt"]], dtype=np.int64)
        logits, past = self._step(ids, hidden, mask, self._empty_past(1))  # the prompt, not timed
        times = []
        for _ in range(steps):
            ids = np.asarray([[int(logits[0, -1].argmax())]], dtype=np.int64)
            t0 = time.perf_counter_ns()
            logits, past = self._step(ids, hidden, mask, past)
            times.append(time.perf_counter_ns() - t0)
        return times


class TorchSeq2Seq:
    """The PyTorch model of an hf-model folder with OrtSeq2Seq's interface; greedy is generate()."""

    runtime = "PyTorch"

    def __init__(self, folder: Path, device: str = "cpu"):
        from toolchain.execution.runtime import models

        self.device = device
        self.model, self.tokenizer, self.meta = models.load_artifact(folder, device)
        self.task = self.meta.get("task")
        self.dtype = self.meta.get("dtype", "float32")
        self.generation = generation_settings(self.model)

    def describe(self) -> str:
        attn = getattr(self.model.config, "_attn_implementation", None)
        return f"PyTorch {self.dtype} ({attn} attention) on {self.device}"

    def _tensors(self, inputs: dict) -> dict:
        dtype = next(self.model.parameters()).dtype
        return {k: torch.from_numpy(v).to(self.device, dtype=dtype if k == "input_features" else torch.long)
                for k, v in inputs.items()}

    @torch.no_grad()
    def encode(self, inputs: dict) -> np.ndarray:
        return self.model.get_encoder()(**self._tensors(inputs)).last_hidden_state.float().cpu().numpy()

    @torch.no_grad()
    def greedy(self, inputs: dict, new_tokens: int) -> list[int]:
        out = self.model.generate(**self._tensors(inputs), do_sample=False, num_beams=1, max_new_tokens=new_tokens)
        seq = out[0].tolist()
        prompt = self.generation["decoder_prompt"]
        if self.task != SPEECH_TASK or seq[: len(prompt)] == prompt:  # Whisper's generate() strips its prompt
            seq = seq[len(prompt):]
        eos = set(self.generation["eos_token_id"])
        for i, tok in enumerate(seq):  # up to and including the first end token (batch 1: nothing padded after it)
            if tok in eos:
                return seq[: i + 1]
        return seq

    @torch.no_grad()
    def decode_steps(self, inputs: dict, steps: int) -> list[int]:
        tensors = self._tensors(inputs)
        enc = self.model.get_encoder()(**tensors)
        mask = tensors.get("attention_mask")
        kw = {"attention_mask": mask} if mask is not None else {}
        ids = torch.tensor([self.generation["decoder_prompt"]], device=self.device)
        out = self.model(encoder_outputs=enc, decoder_input_ids=ids, use_cache=True, **kw)
        times = []
        for _ in range(steps):
            ids = out.logits[:, -1:].argmax(-1)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter_ns()
            out = self.model(encoder_outputs=enc, decoder_input_ids=ids, past_key_values=out.past_key_values,
                             use_cache=True, **kw)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter_ns() - t0)
        return times


def open_runner(folder: Path, artifact: str, device: str = "cpu", provider: str | None = None, cache_dir=None):
    if artifact == "onnx-model":
        return OrtSeq2Seq(folder, device, provider, cache_dir)
    return TorchSeq2Seq(folder, device)


# -- inputs ------------------------------------------------------------------------------------------
def synth_audio(index: int, seconds: float | None = None) -> np.ndarray:
    """A deterministic speech-like signal (no recordings exist here): a voiced tone with a gliding
    pitch and its harmonics under a syllable-rate envelope, plus a little noise; 16 kHz, 1-8 s."""
    rng = np.random.default_rng(index)
    seconds = seconds or float(rng.uniform(1.0, 8.0))
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = rng.uniform(90, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 5) * t)) ** 2
    signal = 0.3 * voice * envelope + 0.01 * rng.standard_normal(t.size)
    return signal.astype(np.float32)


def feature_extractor(model_config: dict):
    """WhisperFeatureExtractor with its defaults (30 s chunks, 16 kHz), for the model's mel bins."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=model_config.get("num_mel_bins", 80))


def input_batches(task: str, tokenizer, model_config: dict, p, recipe_dir) -> tuple[list[dict], str]:
    """validate's inputs in batches: real text passages (tokenized, padded) for text models, or
    synthesised audio through WhisperFeatureExtractor for speech models; and what they are."""
    from toolchain.execution.runtime import text

    if task == SPEECH_TASK:
        fe = feature_extractor(model_config)
        batches = []
        for start in range(0, p.samples, p.batch_size):
            signals = [synth_audio(i) for i in range(start, min(start + p.batch_size, p.samples))]
            feats = fe(signals, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
            batches.append({"input_features": feats.astype(np.float32)})
        return batches, (f"{p.samples} synthesised speech-like signals (1-8 s, 16 kHz; no recordings) through "
                         "WhisperFeatureExtractor() defaults")
    texts = text.passages(p.corpus, recipe_dir, p.samples)
    batches = []
    for i in range(0, len(texts), p.batch_size):
        ids, mask = text.tokenize(tokenizer, texts[i:i + p.batch_size], p.max_length)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches, f"{len(texts)} passages of {p.corpus}"


def generation_inputs(task: str, tokenizer, model_config: dict, p, recipe_dir, count: int) -> list[dict]:
    """One input per generation comparison (batch 1): passages after validate's own, or other signals."""
    from toolchain.execution.runtime import text

    if task == SPEECH_TASK:
        fe = feature_extractor(model_config)
        return [{"input_features": fe([synth_audio(10_000 + i)], sampling_rate=SAMPLE_RATE,
                                      return_tensors="np")["input_features"].astype(np.float32)} for i in range(count)]
    out = []
    for prompt in text.passages(p.corpus, recipe_dir, count + p.samples)[-count:]:
        enc = tokenizer(prompt, truncation=True, max_length=p.max_length, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


# -- validate ----------------------------------------------------------------------------------------
def run_validation(ctx) -> dict:
    import json

    from toolchain.planning import tolerances
    from toolchain.planning.artifacts import ArtifactFacts
    from toolchain.execution.runtime import compare

    p = ctx.params
    ctx.progress("loading reference and candidate")
    ref = TorchSeq2Seq(ctx.inputs["reference"], p.device)
    cand = open_runner(ctx.inputs["candidate"], ctx.input_meta["candidate"]["artifact"], p.device,
                       ctx.onnx_provider("candidate"), ctx.cache_dir)
    precision = ArtifactFacts.from_dict(cand.meta).precision
    d = tolerances.defaults(precision)
    atol = p.atol if p.atol is not None else d["atol"]
    rtol = p.rtol if p.rtol is not None else d["rtol"]
    min_cos = p.min_cosine if p.min_cosine is not None else d["min_cosine"]
    config = json.loads((Path(ctx.inputs["reference"]) / "config.json").read_text())
    try:
        batches, what = input_batches(ref.task, ref.tokenizer, config, p, ctx.recipe_dir)
    except (OSError, ValueError) as exc:
        from toolchain.errors import StageUserError

        raise StageUserError(f"corpus {p.corpus!r}: {exc}") from None
    stats = compare.OutputStats(atol, rtol)
    for i, batch in enumerate(batches):
        ctx.progress("comparing encoder outputs", i, len(batches))
        stats.add(cand.encode(batch), ref.encode(batch), batch.get("attention_mask"))
    name = "encoder last_hidden_state"
    outputs = {name: stats.result(min_cos)}
    failures = []
    o = outputs[name]
    if not o["passed"]:
        why = []
        if o["nonfinite"]:
            why.append(f"{o['nonfinite']} non-finite values")
        if o["atol"] is not None and o["min_atol_to_pass"] > o["atol"]:
            why.append(f"max abs error {o['max_abs']:.3g} exceeds atol {o['atol']:g} + rtol {o['rtol']:g}*|ref| "
                       f"(atol {o['min_atol_to_pass']:.3g} would have passed)")
        if o["min_cosine_gate"] is not None and o["min_cosine"] < o["min_cosine_gate"]:
            why.append(f"cosine similarity {o['min_cosine']:.6f} below {o['min_cosine_gate']}")
        failures.append(f"{name}: " + "; ".join(why))
    metrics = {"outputs": outputs, "precision": precision, "inputs": what, "samples": p.samples,
               "corpus": None if ref.task == SPEECH_TASK else p.corpus, "candidate_desc": cand.describe(),
               "reference_desc": ref.describe()}
    gen = tolerances.generate_params(p.generate)
    if gen.prompts:
        min_agree = gen.min_agreement if gen.min_agreement is not None else d["min_generation"]
        asked = (p.generate or {}).get("new_tokens")
        new = max_new_tokens(ref.generation, asked)
        prompts = generation_inputs(ref.task, ref.tokenizer, config, p, ctx.recipe_dir, gen.prompts)
        equal, first_diff, lengths = 0, [], []
        for i, inputs in enumerate(prompts):
            ctx.progress("comparing greedy generation", i, len(prompts))
            a = ref.greedy(inputs, new)
            try:
                b = cand.greedy(inputs, new)
            except ValueError as exc:
                from toolchain.errors import StageUserError

                raise StageUserError(str(exc)) from None
            lengths.append(len(a))
            if a == b:
                equal += 1
            else:
                first_diff.append(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        metrics["generation"] = {"prompts": len(prompts), "new_tokens": new,
                                 "mean_first_divergence": (sum(first_diff) + new * equal) / len(prompts),
                                 "new_tokens_from": "validate params" if asked else "generation config",
                                 "decoder_prompt": ref.generation["decoder_prompt"], "equal": equal,
                                 "agreement": equal / len(prompts), "min_agreement": min_agree,
                                 "first_divergence": first_diff, "mean_tokens": sum(lengths) / len(lengths),
                                 "reference": "generate(do_sample=False, num_beams=1)",
                                 "candidate": "toolchain's greedy loop over the encoder and the decoder with past"
                                 if isinstance(cand, OrtSeq2Seq) else "generate(do_sample=False, num_beams=1)"}
        if min_agree is not None and equal / len(prompts) < min_agree:
            failures.append(f"greedy generation equal for {equal} of {len(prompts)} inputs (needs {min_agree:.0%})")
    metrics["failures"] = failures
    metrics["passed"] = not failures
    return metrics


# -- benchmark ---------------------------------------------------------------------------------------
def measure(runner, p, folder: Path, progress=lambda *a, **k: None) -> dict:
    """Encoder forward latency per (batch, sequence) shape, and the decoder's per-token latency."""
    import json

    from toolchain import environment
    from toolchain.execution.runtime import timing
    from toolchain.planning.stages.benchmark import grid

    config = json.loads((Path(folder) / "config.json").read_text())
    speech = runner.task == SPEECH_TASK
    rng = np.random.default_rng(p.seed)
    timings, warnings = {}, []

    def inputs(batch: int, seq: int) -> dict:
        if speech:  # Whisper's encoder takes 30 s of features whatever the audio's length
            frames = 2 * config.get("max_source_positions", 1500)
            return {"input_features": rng.standard_normal((batch, config.get("num_mel_bins", 80), frames))
                    .astype(np.float32)}
        return {"input_ids": rng.integers(5, 1000, size=(batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), dtype=np.int64)}

    shapes = grid(p)
    for batch, seq in shapes:
        name = f"encoder b{batch}" + ("" if speech else f" s{seq}")
        x = inputs(batch, seq)
        progress(f"timing {name} ({p.warmup} warm-up + {p.iterations})")
        samples = timing.measure(lambda: runner.encode(x), p.warmup, p.iterations)
        t = timing.summarize(samples, batch, "inputs/s")
        t.update(batch_size=batch, **({"frames": x["input_features"].shape[-1]} if speech else {"sequence_length": seq}))
        timings[name] = t
    steps = p.decode_tokens or 16
    progress(f"timing {steps} decoder steps")
    x = inputs(1, shapes[0][1])
    runner.decode_steps(x, min(steps, 4))  # warm-up
    samples = []
    while len(samples) < max(p.iterations, steps):
        samples += runner.decode_steps(x, steps)
    t = timing.summarize(samples, 1, "tokens/s")
    t.update(batch_size=1, decode_tokens=steps, timer="host clock around each decoder step (past of the steps "
             "before; cross-attention recomputed from the encoder states)" if isinstance(runner, OrtSeq2Seq)
             else "host clock around each decoder step")
    timings["decoder (per token)"] = t
    for name, t in timings.items():
        if t.get("cov", 0) > p.max_cov:
            warnings.append(f"{name}: coefficient of variation {t['cov']:.1%} is above {p.max_cov:.0%}; "
                            "the machine may be busy, or raise `iterations`")
    hw = environment.fact("hardware", p.device)
    return {"runtime": runner.describe(), "device_name": hw.get("gpu") or hw.get("cpu"),
            "batch_size": p.batch_size, "sequence_length": p.sequence_length, "warmup": p.warmup,
            "timer": "host clock (perf_counter) around each call", "timings": timings, "warnings": warnings}
