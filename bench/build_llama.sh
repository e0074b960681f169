#!/bin/sh
# Builds llama-server and llama-batched-bench from the llama.cpp sources vendored in the llama-cpp-python sdist we
# pin, into bench/.llama-build/ (git-ignored), so the bench compares against the very same kernels. Run once by hand
# (15-25 minutes on 2 cores); never in CI. Low priority and -j2 so it does not starve other work on the machine.
#   sh bench/build_llama.sh        -> bench/.llama-build/build/bin/{llama-server,llama-batched-bench}
set -eu
VERSION=0.3.36
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="$HERE/.llama-build"
JOBS=${JOBS:-2}
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -d "src/vendor/llama.cpp" ]; then
    python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d sdist
    rm -rf src && mkdir src
    tar -xzf sdist/llama_cpp_python-$VERSION.tar.gz -C src --strip-components=1
fi
if [ ! -f build/build.ninja ] && [ ! -f build/Makefile ]; then
    GEN=""
    command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
    cmake -S src/vendor/llama.cpp -B build $GEN -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
fi
nice -n 19 cmake --build build -j "$JOBS" --target llama-server llama-batched-bench
ls -l build/bin/llama-server build/bin/llama-batched-bench
