"""Facts about this machine that cache keys depend on, read without importing torch & co.

Package versions come from installed distribution metadata; GPU facts from `nvidia-smi`.
Heavy imports happen only in `describe()` (the `toolchain env` command).
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from importlib import metadata

# fact name -> distributions that provide it (first installed wins)
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "accelerate": ("accelerate",),
    "safetensors": ("safetensors",),
    "tokenizers": ("tokenizers",),
    "gguf": ("gguf",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "numpy": ("numpy",),
    "bitsandbytes": ("bitsandbytes",),
    "flash_attn": ("flash-attn", "flash_attn"),
    "flash_attn_4": ("flash-attn-4",),
    "triton": ("triton", "pytorch-triton"),  # Inductor's GPU code generator
    "onnxruntime_genai": ("onnxruntime-genai", "onnxruntime-genai-cuda"),  # its model builder (export_onnx)
}
# onnxruntime flavours install the same module; which distribution is present matters.
ORT_FLAVOURS = ("onnxruntime-gpu", "onnxruntime-rocm", "onnxruntime-openvino", "onnxruntime")


@functools.lru_cache(maxsize=None)
def package_version(fact: str) -> str | None:
    for dist in PACKAGES.get(fact, (fact,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def onnxruntime_flavour() -> str | None:
    """`onnxruntime-gpu==1.31.1` style, or None; several flavours at once is reported as such."""
    found = []
    for dist in ORT_FLAVOURS:
        try:
            found.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return "+".join(found) or None


@functools.lru_cache(maxsize=4)
def _smi_rows(smi: str) -> tuple:
    """(facts, uuid) of every GPU that nvidia-smi at `smi` reports: asked once per process."""
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap,memory.total,driver_version,uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            rows.append(({"name": parts[0], "capability": parts[1], "memory": parts[2], "driver": parts[3]}, parts[4]))
    return tuple(rows)


def gpus() -> tuple[dict, ...]:
    """NVIDIA GPUs this process may use, as reported by nvidia-smi (empty when there is none), in
    CUDA's numbering: CUDA_VISIBLE_DEVICES (indices or UUIDs) selects and orders them."""
    smi = shutil.which("nvidia-smi")
    if os.environ.get("TOOLCHAIN_NO_GPU") or not smi:
        return ()
    rows = _smi_rows(smi)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return tuple(facts for facts, _ in rows)
    visible = []
    for token in (t.strip() for t in spec.split(",")):
        if token.isdigit():
            match = rows[int(token)] if int(token) < len(rows) else None
        else:
            match = next((r for r in rows if token and r[1].startswith(token)), None)
        if match is None:  # CUDA ignores everything from the first entry it cannot resolve
            break
        visible.append(match[0])
    return tuple(visible)


def gpu(device: str) -> dict | None:
    """Facts of the GPU that `cuda` / `cuda:N` names (N in CUDA's numbering, see `gpus`)."""
    index = int(device.split(":")[1]) if ":" in device else 0
    found = gpus()
    return found[index] if index < len(found) else None


# Environment variables that set how many threads the CPU runtimes use: OpenMP and MKL (torch),
# OpenBLAS (numpy) and onnxruntime's default session pools. They change CPU timings without
# changing the CPU, so CPU measurements keep them in their key.
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "MKL_NUM_THREADS", "MKL_DOMAIN_NUM_THREADS",
               "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "ORT_INTRA_OP_NUM_THREADS", "ORT_INTER_OP_NUM_THREADS")


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity: taskset, a cgroup cpuset), which the runtimes
    size their thread pools by; all CPUs where the platform cannot tell."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that decide which vector code Inductor generates (a .pt2 built with AVX-512 does
# not run on an AVX2-only machine)
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return ",".join(flag for flag in ISA_FLAGS if flag in have)
    except OSError:
        pass
    return platform.machine()


@functools.lru_cache(maxsize=1)
def cxx_compiler() -> str | None:
    """First line of `--version` of the C++ compiler Inductor builds CPU code and AOTInductor
    packages with: $CXX, else g++ (clang++ on macOS), as torch._inductor's config picks it."""
    cxx = os.environ.get("CXX") or ("clang++" if platform.system() == "Darwin" else "g++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def fact(name: str, device: str = "cpu"):
    """One named fact. `device` selects the hardware facts (`hardware`, `gpu`)."""
    if name == "python":
        return platform.python_version()
    if name == "platform":
        return f"{platform.system()}-{platform.machine()}"
    if name == "onnxruntime":
        return onnxruntime_flavour()
    if name == "cxx":
        return cxx_compiler()
    if name == "cpu_isa":
        return cpu_isa()
    if name == "device":
        if device.startswith("cuda"):
            g = gpu(device)
            return {"kind": "cuda", "capability": g["capability"] if g else None}
        return {"kind": "cpu"}
    if name == "hardware":  # for measurements: exactly which processor or GPU
        if device.startswith("cuda"):
            g = gpu(device)
            return {"gpu": g["name"] if g else None, "capability": g["capability"] if g else None,
                    "driver": g["driver"] if g else None}
        return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cpus": usable_cpus(),
                "thread_env": {v: os.environ[v] for v in THREAD_VARS if v in os.environ}}
    if name.startswith("lane:"):  # a pinned side environment: the exact versions its lock installs
        from toolchain import lanes

        return lanes.versions(name.removeprefix("lane:"))
    return package_version(name)


def facts(names, device: str = "cpu") -> dict:
    return {n: fact(n, device) for n in sorted(set(names))}


def describe() -> dict:
    """Everything `toolchain env` shows; imports the heavy libraries that are installed."""
    info: dict = {"python": platform.python_version(), "platform": fact("platform"), "cpu": cpu_model(),
                  "cores": os.cpu_count(), "cpu_isa": cpu_isa(), "cxx": cxx_compiler(), "packages": {k: package_version(k) for k in PACKAGES},
                  "onnxruntime": onnxruntime_flavour(), "gpus": list(gpus())}
    try:
        import torch

        info["torch_cuda"] = {"built_with": torch.version.cuda, "available": torch.cuda.is_available(),
                              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    except ImportError:
        info["torch_cuda"] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    return info


# onnxruntime execution providers by target name
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "rocm": "ROCMExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _find_library(name: str) -> bool:
    import ctypes.util

    if ctypes.util.find_library(name):
        return True
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if d and any(f.startswith(f"lib{name}.so") for f in _listdir(d)):
            return True
    return False


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


def provider_status(target: str) -> str | None:
    """None when the onnxruntime provider for `target` can run here, else why not. Static: reads
    installed distributions, GPUs and shared libraries; does not import onnxruntime."""
    flavour = onnxruntime_flavour() or ""
    if not flavour:
        return "onnxruntime is not installed"
    if target == "cpu":
        return None
    if target in ("cuda", "tensorrt"):
        if "onnxruntime-gpu" not in flavour:
            return f"the installed onnxruntime ({flavour}) has no CUDA or TensorRT provider; install onnxruntime-gpu"
        if not gpus():
            return "no NVIDIA GPU is visible"
        if target == "tensorrt" and not _find_library("nvinfer"):
            return "TensorRT's libnvinfer.so.10 is not installed (the TensorRT provider cannot load)"
        return None
    if target == "rocm":
        if "onnxruntime-rocm" not in flavour:
            return f"the installed onnxruntime ({flavour}) has no ROCm provider; install onnxruntime-rocm"
        if not os.path.exists("/dev/kfd"):
            return "no AMD GPU is visible (/dev/kfd missing)"
        return None
    return f"unknown provider target {target!r}"
