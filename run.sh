#!/usr/bin/env bash
# Experiment presets.
#   bash run.sh                  the paper's configuration (Pythia-1B from the Hub, WikiText-103)
#   bash run.sh demo             offline on a CPU in a few minutes (SmolLM2-135M, fictional articles)
#   bash run.sh PRESET [FLAGS]   extra flags go after the preset's own, so they override them
set -euo pipefail
cd "$(dirname "$0")"
preset="paper"
if [[ $# -gt 0 && "$1" != --* ]]; then preset="$1"; shift; fi
PYTHON="${PYTHON:-python}"

case "$preset" in
  paper)
    # --- LLM Related ---
    lm_name=pythia; lm_size=1b; num_gpus=1; lm_cache_dir=none; data_cache_dir=none
    # --- Data Related ---
    max_labels=10; max_segements=10; segment_length=128; max_length=256
    # --- Document Memory Related ---
    key_dim=2            # dimension of random document representation
    key_activation=tanh  # inductive bias of document memory selection
    hook_memory_dim=32   # how many memories
    hook_memory_layer=15 # location of the memory
    lm_act=gelu; negative_key_type=other; document_key_module_type=linear
    target_negative_ce=4.5
    guidance=0.1         # alpha (guidance parameter)
    # --- Training Related ---
    batch_size=16; lr=1e-3; num_accumulation_steps=1; grad_clip_coeff=5; num_epochs=500; save_freq=10; seed=1
    save_dir="outputs/$lm_name/$lm_size"
    exec "$PYTHON" train_guidance.py \
      --lm_name "$lm_name" --lm_size "$lm_size" --num_gpus "$num_gpus" \
      --lm_cache_dir "$lm_cache_dir" --data_cache_dir "$data_cache_dir" \
      --dataset wikitext-103-v1 --max_labels "$max_labels" --max_segements "$max_segements" \
      --segment_length "$segment_length" --max_length "$max_length" \
      --key_dim "$key_dim" --key_activation "$key_activation" --hook_memory_dim "$hook_memory_dim" \
      --hook_memory_layer "$hook_memory_layer" --lm_act "$lm_act" --negative_key_type "$negative_key_type" \
      --document_key_module_type "$document_key_module_type" --target_negative_ce "$target_negative_ce" \
      --guidance "$guidance" --batch_size "$batch_size" --lr "$lr" \
      --num_accumulation_steps "$num_accumulation_steps" --grad_clip_coeff "$grad_clip_coeff" \
      --num_epochs "$num_epochs" --save_freq "$save_freq" --seed "$seed" --save_dir "$save_dir" "$@"
    ;;
  demo)
    # SmolLM2-135M (installed by pip, weights inside), five fictional articles nobody can know.
    exec "$PYTHON" train_guidance.py \
      --lm_name smollm2 --lm_size 135m --num_gpus 0 \
      --dataset synthetic --synthetic_articles 20 --max_labels 5 --max_segments 3 --segment_length 48 \
      --max_length 96 --key_dim 2 --key_activation tanh --hook_memory_dim 32 --hook_memory_layer 27 \
      --negative_key_type other --target_negative_ce 4.5 --guidance 0.1 \
      --batch_size 16 --lr 3e-3 --num_epochs 40 --save_freq 10 --seed 1 --save_dir outputs/demo "$@"
    ;;
  ablations)
    # The paper's comparisons at demo scale, each a demo run with one change, then one report:
    # key activation tanh / relu / sigmoid; linear key generator vs the released make_mlp with 3, 4, 5
    # linear layers (--key_internal_layers 2, 3, 4: input, L - 1 hidden-to-hidden, output); guidance 0, 0.1,
    # 0.5; negative keys other / random / zero / perturb; a shared memory without keys.
    # The baseline (tanh, linear, guidance 0.1, other) is run once, with the demo's 40 epochs;
    # extra FLAGS go to every run (and override).
    # ABLATIONS_DIR (outputs/ablations) holds <name>/run_N and report/; EVAL_ARGS go to the
    # evaluation (default --grid 5: the landscape is its costliest part).
    root="${ABLATIONS_DIR:-outputs/ablations}"
    names=(baseline act_relu act_sigmoid keygen_3linear keygen_4linear keygen_5linear
           guidance_0 guidance_0.5 neg_random neg_zero neg_perturb shared)
    flags=("" "--key_activation relu" "--key_activation sigmoid"
           "--document_key_module_type nonlinear --key_internal_layers 2"
           "--document_key_module_type nonlinear --key_internal_layers 3"
           "--document_key_module_type nonlinear --key_internal_layers 4"
           "--guidance 0" "--guidance 0.5"
           "--negative_key_type random" "--negative_key_type zero" "--negative_key_type perturb"
           "--document_memory shared")
    runs=()
    for i in "${!names[@]}"; do
      echo "=== ablation ${names[$i]}: ${flags[$i]:-(demo settings)}" >&2
      # shellcheck disable=SC2086  # the flags are meant to split into words
      bash ./run.sh demo --save_freq 20 ${flags[$i]} --save_dir "$root/${names[$i]}" "$@"
      runs+=("$root/${names[$i]}")
    done
    # shellcheck disable=SC2086
    exec "$PYTHON" evaluate_memory.py --compare "${runs[@]}" --out "$root/report" ${EVAL_ARGS:---grid 5}
    ;;
  *)
    echo "run.sh: unknown preset '$preset' (allowed: paper, demo, ablations)" >&2
    exit 2
    ;;
esac
