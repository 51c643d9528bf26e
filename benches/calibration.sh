#!/usr/bin/env bash
# A calibration text for `nibble-tools imatrix`, sampled from the model itself, so it shares nothing
# with an evaluation text by construction: one 1000-token continuation of each of 16 varied prompts
# (temperature 0.8, seed = the prompt's index), concatenated. About 16k tokens, 10 minutes on 2 cores.
#
#   benches/calibration.sh MODEL.nbl OUT.txt
#
# NIBBLE (default target/release/nibble) is the nibble binary.
set -euo pipefail
if (($# != 2)); then
  echo "usage: $0 MODEL.nbl OUT.txt" >&2
  exit 2
fi
model=$1 out=$2
nibble=${NIBBLE:-target/release/nibble}
prompts=(
  "The history of the printing press"
  "def merge_sort(items):"
  "Dear hiring manager,"
  "Photosynthesis is the process by which"
  "Once upon a time in a small village by the sea,"
  "The main causes of the First World War were"
  "Here is a recipe for a simple vegetable soup."
  "In mathematics, a prime number is"
  "The stock market fell sharply on Monday after"
  "How do I fix a flat bicycle tyre?"
  "The French Revolution began in 1789 when"
  "SELECT name, COUNT(*) FROM orders"
  "Climate change affects agriculture in several ways."
  "The patient presented with a fever and"
  "A beginner's guide to learning the piano:"
  "The spacecraft entered orbit around Mars and"
)
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
for i in "${!prompts[@]}"; do
  echo "calibration: prompt $((i + 1))/${#prompts[@]}" >&2
  "$nibble" run -m "$model" -p "${prompts[$i]}" -n 1000 --temp 0.8 --seed "$i" --ignore-eos -t "$(nproc)" \
    2>/dev/null >>"$tmp"
  printf '\n\n' >>"$tmp"
done
mv "$tmp" "$out"
trap - EXIT
