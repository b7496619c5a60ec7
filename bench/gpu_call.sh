#!/bin/bash
# One device call: run each "name|timeout|command" line of $1 in order, logs and results tarred to $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
while IFS='|' read -r name limit cmd; do
  [ -z "$name" ] && continue
  echo "=== $name ($limit s): $cmd"; start=$(date +%s)
  timeout "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
  tail -25 "$OUT/$name.log"
done < "$1"
tar czf "$OUT/results.tgz" bench/results
