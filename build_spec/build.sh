#!/usr/bin/env bash
# Builds the one-file executable: dist/koboldcpp (dist/koboldcpp.exe on Windows, run from Git Bash or use the
# PyInstaller command below directly).
#   bash build_spec/build.sh                 # without the model: dist/koboldcpp
#   bash build_spec/build.sh --with-model    # embeds Gemma 3 270M: dist/koboldcpp-with-model
# Any other arguments go to PyInstaller (e.g. --distpath DIR --workpath DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
spec_args=()
pyi_args=()
for a in "$@"; do
  case "$a" in
    --with-model) spec_args+=(--with-model --name koboldcpp-with-model) ;;
    *) pyi_args+=("$a") ;;
  esac
done
if ! "$PY" -c "import PyInstaller, llama_cpp" 2>/dev/null; then
  "$PY" -m pip install -q -r requirements-build.txt
fi
exec "$PY" -m PyInstaller --noconfirm --clean --log-level WARN "${pyi_args[@]}" build_spec/koboldcpp.spec -- "${spec_args[@]}"
