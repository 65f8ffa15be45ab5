"""Encoder-decoder (seq2seq) models: runners for the ONNX folder and the PyTorch model with one
interface, and their inputs. The export is seq2seq_export.py, `validate`'s work seq2seq_validate.py,
`benchmark`'s seq2seq_bench.py: separate modules, so that each stage's key depends on its own code.

The folder's two graphs, and why cross-attention is recomputed each step: seq2seq_export.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from toolchain.execution.runtime.seq2seq_export import SAMPLE_RATE, SPEECH_TASK, generation_settings


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
