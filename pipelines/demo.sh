#!/usr/bin/env bash
# The quickstart demo, end to end on the embedded emoji shards (shards/demo/):
#   data loader throughput → pretrain → retrieval index → search → zero-shot classification.
# Each step is the command a user would type; run from the repository root with the
# project's virtualenv on PATH (the README's first command does both).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo}
val='shards/demo/val-{000000..000001}.tar'
all="shards/demo/train-{000000..000007}.tar::$val"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 data loader throughput on the demo shards vs a plain decode loop (docs/benchmarks.md)"
python tools/bench_data.py --generated 0 --quick

# A wall-clock budget, not a step count, ends pretraining: the quickstart takes the same
# time on a slow machine as on a fast one, and a fast one spends it learning (the recipe's
# 240 steps are raised out of the way). The LR schedule follows the budget, so warmup (the
# recipe's share of the run) and decay both finish inside it.
step "2/5 pretrain (configs/demo.yaml, 10 minutes; prints the held-out retrieval table at the end)"
deepspeed pipelines/pretrain.py output_dir="$out" train.max_minutes=10 train.steps=1000000

step "3/5 build a FAISS index over every demo image"
python pipelines/build_index.py --model "$out/model" --shards "$all" --out "$out/index"

# Plain ITC search. --rerank itm|filip reorders the top candidates by index score + rerank
# score, for a model pretrained with them (loss.itm=1, loss.filip=1: the demo trains ITC
# alone, as neither rerank has beaten ITC yet; docs/benchmarks.md).
step "4/5 search: text → image, top 5"
python pipelines/search.py --index "$out/index" --text "a red apple" -k 5

step "5/5 zero-shot: emoji group of each held-out image"
python pipelines/zeroshot.py --model "$out/model" --images "$val" --label-field group \
    --classes configs/demo_classes.txt --out "$out/zeroshot"

step "done: $out/eval.json, $out/index/, $out/zeroshot/ (serve: python pipelines/serve.py --index $out/index)"
