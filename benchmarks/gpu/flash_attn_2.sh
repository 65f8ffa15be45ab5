#!/usr/bin/env bash
# FlashAttention-2 (flash-attn) for the GPU host. The package index has only its source, and a full
# build (forward, split-KV and backward kernels for four GPU generations) takes about 20 minutes of
# the host's 30. For inference on an H100/H200 we build what runs: sm_90 only, with upstream's own
# build switches (commented out in its setup.py) that drop backward, dropout, ALiBi, softcap and
# sliding-window instantiations. The forward kernels that do get built are the same template
# instantiations as in a full build; a call that needs a dropped feature raises ("This flash
# attention build does not support ...") instead of running something else.
#
#   here (with network):  bash benchmarks/gpu/flash_attn_2.sh fetch   -> .gpu/fa2/ (source + build tools)
#   GPU host, after the wheel parts of README "GPU results", in the same warm session:
#       bash benchmarks/gpu/flash_attn_2.sh build   (carry .gpu/fa2; rerun to resume a cut-off build)
#   then `source $HOME/gpu-env.sh` also puts flash-attn on the path.
set -euo pipefail
VERSION=2.8.3.post2
TOOLS=(setuptools==80.9.0 wheel==0.45.1 packaging==25.0 ninja==1.13.0 einops==0.8.1)
DIR=.gpu/fa2

case ${1:-} in
fetch)
  mkdir -p "$DIR"
  # pip cannot download this sdist without running its setup.py, which imports torch with CUDA:
  # take the file the index lists (pip still fetches the build tools, as wheels for the host)
  url=$(python3 - "$VERSION" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request("https://pypi.org/simple/flash-attn/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
name = f"flash_attn-{sys.argv[1]}.tar.gz"
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
print(next(f["url"] for f in files if f["filename"] == name))
PY
)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DIR" "${TOOLS[@]}"
  curl -sSfL -o "$DIR/flash_attn-$VERSION.tar.gz" "$url"
  du -sh "$DIR"; ls "$DIR" ;;
build)
  source "$HOME/gpu-env.sh"
  SRC=/tmp/flash-attn-src TOOLDIR=$HOME/fa2-tools SITE=$HOME/fa2-site
  if [ ! -f "$SRC/.patched" ]; then
    rm -rf "$SRC"; mkdir -p "$SRC"
    tar -xzf "$DIR/flash_attn-$VERSION.tar.gz" -C "$SRC" --strip-components=1
    python3 - "$SRC/setup.py" <<'PY'
import sys
path = sys.argv[1]
s = open(path).read()
flags = ["BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "LOCAL"]
for f in flags:  # the first occurrence is the CUDA build's nvcc_flags list
    old = f'# "-DFLASHATTENTION_DISABLE_{f}",'
    assert old in s, old
    s = s.replace(old, f'"-DFLASHATTENTION_DISABLE_{f}",', 1)
old = 'compiler_c17_flag=["-O3", "-std=c++17"]'  # flash_api.cpp checks the same switches
assert s.count(old) == 1
s = s.replace(old, 'compiler_c17_flag=["-O3", "-std=c++17"' +
              "".join(f', "-DFLASHATTENTION_DISABLE_{f}"' for f in flags) + "]")
open(path, "w").write(s)
PY
    touch "$SRC/.patched"
  fi
  python3 -m pip install -q --no-index --no-deps --upgrade --target "$TOOLDIR" "$DIR"/*.whl
  export PYTHONPATH=$TOOLDIR:$PYTHONPATH PATH=$TOOLDIR/bin:$TOOLDIR/ninja/data/bin:$PATH
  ninja --version >/dev/null
  echo "building flash-attn $VERSION for sm_90 on $(nproc) cores, nvcc $(nvcc --version | grep -o 'release [0-9.]*')"
  t0=$SECONDS
  # ninja keeps finished objects in $SRC/build: a rerun after a cut-off continues where it stopped
  (cd "$SRC" && FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=$(nproc) NVCC_THREADS=1 \
     python setup.py -q bdist_wheel > "$SRC/build.log" 2>&1) || { tail -30 "$SRC/build.log"; exit 1; }
  echo "built in $((SECONDS - t0)) s: $(ls "$SRC"/dist)"
  rm -rf "$SITE"
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$SRC"/dist/*.whl "$DIR"/einops-*.whl
  # flash-attn 2 ships an old copy of flash_attn/cute; the flash-attn-4 package owns that folder
  if [ -d "$HOME/gpu-site/flash_attn/cute" ]; then
    rm -rf "$SITE/flash_attn/cute" && ln -s "$HOME/gpu-site/flash_attn/cute" "$SITE/flash_attn/cute"
  fi
  grep -q fa2-site "$HOME/gpu-env.sh" || echo "export PYTHONPATH=$SITE:\$PYTHONPATH" >> "$HOME/gpu-env.sh"
  source "$HOME/gpu-env.sh"
  python -c "import flash_attn, flash_attn_2_cuda; print('flash_attn', flash_attn.__version__, 'imports')" ;;
*) echo "usage: $0 fetch|build" >&2; exit 2 ;;
esac
