#!/usr/bin/env bash
# nibble vs llama.cpp, side by side, in one run: for each (nibble .nbl, llama.cpp .gguf) pair, runs
# `nibble bench` and `llama-bench` alternately (never at the same time: two spinning thread pools
# on few cores ruin both), REPS rounds each, and prints a Markdown table of the medians and their
# ratio. Run it on an idle machine.
#
#   benches/compare.sh [-t THREADS] [-p PP] [-n TG] [-d DEPTH] [-r ROUNDS] NBL GGUF [NBL GGUF ...]
#
# LLAMA_BIN (default /work/cache/llamacpp/bin) holds llama-bench, as built by
# ../shared/peers/build-llamacpp.sh; NIBBLE (default target/release/nibble) is the nibble binary;
# LLAMA_ARGS adds llama-bench flags (e.g. "-fa 0": at depth, compare with llama.cpp's better setting).
set -euo pipefail
threads=2 pp=512 tg=128 depth=0 rounds=3
while getopts "t:p:n:d:r:" opt; do
  case $opt in
    t) threads=$OPTARG ;; p) pp=$OPTARG ;; n) tg=$OPTARG ;; d) depth=$OPTARG ;; r) rounds=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if (($# == 0 || $# % 2)); then
  echo "usage: $0 [-t T] [-p PP] [-n TG] [-d DEPTH] [-r ROUNDS] NBL GGUF [NBL GGUF ...]" >&2
  exit 2
fi
nibble=${NIBBLE:-target/release/nibble}
llama=${LLAMA_BIN:-/work/cache/llamacpp/bin}/llama-bench
for f in "$nibble" "$llama"; do
  [[ -x $f ]] || { echo "error: $f not found or not executable" >&2; exit 1; }
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "date: $(date -u +%F' '%H:%M) UTC; $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); threads $threads; pp$pp, tg$tg at depth $depth; $rounds rounds; llama-bench extra: ${LLAMA_ARGS:-none}"
echo
echo "| nibble model | llama.cpp model | nibble pp | llama.cpp pp | pp ratio | nibble tg | llama.cpp tg | tg ratio |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
while (($#)); do
  nbl=$1 gguf=$2
  shift 2
  n_pp=() n_tg=() l_pp=() l_tg=()
  for ((i = 0; i < rounds; i++)); do
    j=$("$nibble" bench -m "$nbl" -p "$pp" -n "$tg" -d "$depth" -t "$threads" -r 1 --json 2>/dev/null)
    n_pp+=("$(jq -r .pp_tps <<<"$j")")
    n_tg+=("$(jq -r .tg_tps <<<"$j")")
    j=$("$llama" -m "$gguf" -p "$pp" -n 0 -t "$threads" ${LLAMA_ARGS:-} -r 1 -o json 2>/dev/null)
    l_pp+=("$(jq -r '.[0].avg_ts' <<<"$j")")
    j=$("$llama" -m "$gguf" -p 0 -n "$tg" -d "$depth" -t "$threads" ${LLAMA_ARGS:-} -r 1 -o json 2>/dev/null)
    l_tg+=("$(jq -r '.[0].avg_ts' <<<"$j")")
  done
  np=$(printf '%s\n' "${n_pp[@]}" | median) nt=$(printf '%s\n' "${n_tg[@]}" | median)
  lp=$(printf '%s\n' "${l_pp[@]}" | median) lt=$(printf '%s\n' "${l_tg[@]}" | median)
  printf '| %s | %s | %.1f | %.1f | %.2f× | %.1f | %.1f | %.2f× |\n' \
    "$(basename "$nbl")" "$(basename "$gguf")" "$np" "$lp" "$(bc -l <<<"$np/$lp")" \
    "$nt" "$lt" "$(bc -l <<<"$nt/$lt")"
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
