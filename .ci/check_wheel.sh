#!/usr/bin/env bash
# What a user installs, used as a user would (`make check-wheel`, run by .ci/run):
#   1. the sdist, and a wheel built from that sdist (so the sdist is known to be complete);
#   2. the wheel installed into a fresh venv, dependencies from the index, the CPU torch pinned;
#   3. from a folder outside the checkout, with a PATH that lacks the venv (a direct venv/bin/fastsr
#      call, as pipx gives) and an empty extension cache: info, selftest (builds the C++ extension,
#      so ninja must be found through Python), upscale of a photo on the cpp backend, the demo;
#   4. the sdist's own tests, collected from the unpacked sdist (no fastsr/ beside them), and the
#      ones that need no source tree run against the installed package, one intra-op thread a
#      process and $PYTEST_PARALLEL (`make check-wheel` passes make test's workers and time limit).
# Any failure exits non-zero.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
: "${TORCH_PIN:=torch==2.13.0+cpu}" "${TORCH_INDEX:=https://download.pytorch.org/whl/cpu}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "== check-wheel: $*"; }

step "sdist, then a wheel built from it"
"$root/.venv/bin/python" -m build -o "$work/dist" "$root" > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)

step "a fresh venv: $TORCH_PIN, then $(basename "$wheel")[demo] with its dependencies from the index"
"$python" -m venv "$work/venv"
v=$work/venv/bin
bash "$root/.ci/install_torch.sh" "$v/pip"
torch_before=$("$v/python" -c "import torch; print(torch.__version__)")
"$v/pip" install -q "$wheel[demo]"
torch_after=$("$v/python" -c "import torch; print(torch.__version__)")
[ "$torch_before" = "$torch_after" ] || { echo "installing the wheel replaced torch $torch_before by $torch_after"; exit 1; }
if "$v/python" -c "import triton" 2>/dev/null; then echo "triton was installed without being asked for"; exit 1; fi

step "used from $work/use with PATH=/usr/bin:/bin and an empty extension cache"
mkdir "$work/use" && cd "$work/use"
export PATH=/usr/bin:/bin XDG_CACHE_HOME=$work/cache
unset VIRTUAL_ENV TORCH_EXTENSIONS_DIR
"$v/python" -c "import fastsr, sys; sys.exit('fastsr imported from ' + fastsr.__file__) if '$work/venv' not in fastsr.__file__ else None"
"$v/fastsr" --version
"$v/fastsr" selftest
"$v/fastsr" info | tee info.txt
grep -Eq "^ +cpp +cpu +available" info.txt || { echo "the cpp backend is not available from the installed wheel"; exit 1; }
"$v/python" -c "from fastsr.data import export_skimage_photos; export_skimage_photos('.', ('chelsea',))"
"$v/fastsr" upscale chelsea.png chelsea_x4.png --backend cpp
"$v/python" -c "from PIL import Image; assert Image.open('chelsea_x4.png').size == (1804, 1200)"
"$v/fastsr" demo --out demo
ls demo | grep -q png

step "the sdist's tests against the installed package (its [dev] extra added)"
"$v/pip" install -q "$wheel[dev]"
mkdir "$work/src" && tar xzf "$sdist" -C "$work/src" --strip-components=1
mkdir "$work/t" && cp -r "$work/src/tests" "$work/src/conftest.py" "$work/src/pyproject.toml" "$work/src/README.md" "$work/t"
cd "$work/t"
"$v/python" -m pytest -q -p no:cacheprovider --collect-only tests > collect.log || { tail -30 collect.log; exit 1; }
OMP_NUM_THREADS=1 "$v/python" -m pytest -q -p no:cacheprovider ${PYTEST_PARALLEL-} tests/test_api.py tests/test_readme.py tests/test_functional.py \
    tests/test_checkpoint.py tests/test_cpp_build.py
