#!/usr/bin/env bash
# Experiment presets.
#   bash run.sh                  the paper's configuration (Pythia-1B from the Hub, WikiText-103)
#   bash run.sh demo             offline on a CPU in a few minutes (SmolLM2-135M, fictional articles)
#   bash run.sh smollm2          the paper's settings on SmolLM2-135M (offline weights): keyed vs shared memory,
#                                each evaluated, one comparison (needs WikiText: --data_path DIR offline)
#   bash run.sh capacity         how many documents one memory holds: keyed, shared and per-document LoRA,
#                                10/50/200 documents, 32 and 256 entries, each evaluated; one table and one plot
#   bash run.sh scale            capacity past the paper: keyed memory (entries and key_dim grown with the documents,
#                                at most 1 M parameters), shared memory and per-document LoRA matched to it, on
#                                100/300/1,000 documents, cell by cell; bits stored per parameter in the table
#   bash run.sh compare          the method against the alternatives on the demo's documents and settings: keyed
#                                memory (both --memory_init), shared memory, per-document LoRA, shared LoRA, each
#                                with a learning-rate sweep, and the document in the prompt; one report
#   bash run.sh PRESET [FLAGS]   extra flags go after the preset's own, so they override them
set -euo pipefail
cd "$(dirname "$0")"
preset="paper"
if [[ $# -gt 0 && "$1" != --* ]]; then preset="$1"; shift; fi
PYTHON="${PYTHON:-python}"

# Wait for background jobs given as PID:LOG; name each failure with its log's last line. Returns 2 when
# one had bad input (exit 2), 1 when one failed otherwise, else 0.
wait_jobs() {
  local worst=0 item rc
  for item in "$@"; do
    rc=0
    wait "${item%%:*}" || rc=$?
    if (( rc != 0 )); then
      echo "run.sh: exit $rc, see ${item#*:}: $(tail -n 1 "${item#*:}")" >&2
      if (( rc == 2 )); then worst=2; elif (( worst == 0 )); then worst=1; fi
    fi
  done
  return "$worst"
}

# check_methods VARIABLE KIND...: every KIND a method the sweeps know, or one line naming VARIABLE and exit 2
check_methods() {
  local variable="$1" kind
  shift
  for kind in "$@"; do
    case "$kind" in
      keyed|shared|lora|lora_shared) ;;
      *) echo "run.sh: unknown method '$kind' in $variable (allowed: keyed, shared, lora, lora_shared)" >&2
         exit 2 ;;
    esac
  done
}

# sweep LIMIT JOB NAME...: `JOB NAME` for each NAME in the background (JOB: a function of the preset), its
# output in $root/NAME.log, at most LIMIT at once; $root/NAME joins the array `runs`. Returns wait_jobs's
# status once all have ended.
sweep() {
  local limit="$1" job="$2" name pids=()
  shift 2
  for name in "$@"; do
    echo "=== $preset $name: log in $root/$name.log" >&2
    "$job" "$name" >"$root/$name.log" 2>&1 &
    pids+=("$!:$root/$name.log"); runs+=("$root/$name")
    while (( $(jobs -rp | wc -l) >= limit )); do sleep 0.5; done
  done
  wait_jobs "${pids[@]}"
}

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
  smollm2)
    # The paper's experiment on a real pretrained LM that loads offline: SmolLM2-135M (30 blocks, the
    # memory on block 27 as in the demo) with the paper's data and training settings (10 WikiText-103
    # articles x 10 segments of 128 words, max length 256, batch 16, lr 1e-3, 500 epochs), a keyed
    # memory and the shared-memory baseline, each evaluated, then one --compare report.
    # SMOLLM2_DIR (outputs/smollm2) holds keyed/run_N, shared/run_N, report/ and the logs; SMOLLM2_JOBS
    # (1) trainings at once (2 = both together, as one GPU can); EVAL_ARGS go to the evaluation;
    # extra FLAGS go to both trainings, e.g. offline: --dataset wikitext-103-raw-v1 --data_path DIR
    # --data_split test.
    root="${SMOLLM2_DIR:-outputs/smollm2}"
    mkdir -p "$root"
    common=(--lm_name smollm2 --lm_size 135m --dataset wikitext-103-v1 --max_labels 10 --max_segments 10
            --segment_length 128 --max_length 256 --key_dim 2 --key_activation tanh --hook_memory_dim 32
            --hook_memory_layer 27 --lm_act gelu --negative_key_type other --target_negative_ce 4.5 --guidance 0.1
            --batch_size 16 --lr 1e-3 --num_accumulation_steps 1 --grad_clip_coeff 5 --num_epochs 500 --save_freq 10
            --seed 1)
    extra=("$@")
    smollm2_job() {  # the training of one kind of memory
      "$PYTHON" train_guidance.py "${common[@]}" --document_memory "$1" --save_dir "$root/$1" "${extra[@]}"
    }
    runs=()
    sweep "${SMOLLM2_JOBS:-1}" smollm2_job keyed shared || exit $?
    # shellcheck disable=SC2086
    exec "$PYTHON" evaluate_memory.py --compare "$root/keyed" "$root/shared" --out "$root/report" ${EVAL_ARGS:-}
    ;;
  compare)
    # What a user would pick instead, on the demo's documents and settings (run.sh demo): each method of
    # COMPARE_METHODS ("keyed keyed_zero shared lora lora_shared") trained for COMPARE_EPOCHS (40, the demo's)
    # at each learning rate of COMPARE_LRS ("1e-3 3e-3 1e-2"), the same epochs for all; then
    # docmem/evaluation/methods_report.py evaluates every run, picks each method's best run (the highest ROUGE-L
    # recall under the right condition, ties by the lower CE), evaluates the document in the prompt on the
    # same documents and LM, and writes COMPARE_DIR/report/methods.md (+ methods.json, recall.png, ce.png).
    # COMPARE_DIR (outputs/compare) holds <method>_lr<lr>/run_N and a log each; EVAL_ARGS go to the report
    # (default --new_tokens 32 --max_other_keys 2: generation is most of an evaluation's time, and every sweep
    # run is evaluated); extra FLAGS go to every training.
    root="${COMPARE_DIR:-outputs/compare}"
    read -r -a methods <<<"${COMPARE_METHODS:-keyed keyed_zero shared lora lora_shared}"
    read -r -a lrs <<<"${COMPARE_LRS:-1e-3 3e-3 1e-2}"
    epochs="${COMPARE_EPOCHS:-40}"
    method_flags() {  # a method's training flags, or exit 2 for an unknown name
      case "$1" in
        keyed) echo "--document_memory keyed --memory_init released" ;;
        keyed_zero) echo "--document_memory keyed --memory_init zero_output" ;;
        shared) echo "--document_memory shared" ;;
        lora) echo "--document_memory lora" ;;
        lora_shared) echo "--document_memory lora_shared" ;;
        *) echo "run.sh: unknown method '$1' in COMPARE_METHODS (allowed: keyed, keyed_zero, shared, lora, lora_shared)" >&2
           return 2 ;;
      esac
    }
    for method in "${methods[@]}"; do method_flags "$method" >/dev/null || exit 2; done
    mkdir -p "$root"
    report=(); first=""
    for method in "${methods[@]}"; do
      runs=()
      for lr in "${lrs[@]}"; do
        name="${method}_lr${lr}"
        echo "=== compare $name: log in $root/$name.log" >&2
        rc=0
        # shellcheck disable=SC2046  # the method's flags are meant to split into words
        bash ./run.sh demo $(method_flags "$method") --lr "$lr" --num_epochs "$epochs" --save_freq "$epochs" \
          --save_dir "$root/$name" "$@" >"$root/$name.log" 2>&1 || rc=$?
        if (( rc != 0 )); then
          echo "run.sh: exit $rc, see $root/$name.log: $(tail -n 1 "$root/$name.log")" >&2
          exit "$rc"
        fi
        runs+=("$root/$name"); first="${first:-$root/$name}"
      done
      report+=(--method "$method" "${runs[@]}")
    done
    # shellcheck disable=SC2086  # EVAL_ARGS are meant to split into words
    exec "$PYTHON" -m docmem.evaluation.methods_report --out "$root/report" "${report[@]}" --prompt_from "$first" \
      ${EVAL_ARGS:---new_tokens 32 --max_other_keys 2}
    ;;
  capacity)
    # How many documents one memory holds, the question the paper leaves open: each method of CAPACITY_METHODS
    # ("keyed shared lora": keyed memory, shared memory, per-document LoRA with its rank matched to the keyed
    # memory's parameters at the same entries; lora_shared also allowed) at each of CAPACITY_ENTRIES ("32 256")
    # memory entries, trained on each of CAPACITY_DOCS ("10 50 200") fictional articles (--dataset synthetic: as
    # many as asked for, and no LM has seen them), CAPACITY_SEGMENTS (2) segments of 48 words each, 4 documents
    # per step (each with its own key or adapter), CAPACITY_EPOCHS (50) epochs, SmolLM2-135M; each run evaluated
    # (ROUGE-L recall under the right and other keys or adapters, CE matrix); then python -m benchmarks.capacity_report
    # writes one table and one plot against the number of documents into CAPACITY_DIR/report.
    # The CPU-scale sweep: CAPACITY_DOCS="5 20 50" CAPACITY_SEGMENTS=1 bash run.sh capacity. CAPACITY_LR (3e-3)
    # is every method's learning rate; CAPACITY_LORA_LR (CAPACITY_LR) the LoRA methods' (e.g. the best of run.sh compare).
    # CAPACITY_DIR (outputs/capacity) holds <kind>_m<entries>_n<docs>/run_N and a log each;
    # CAPACITY_JOBS (1) runs at once (a GPU holds many); EVAL_ARGS go to every evaluation (default: no
    # landscape, 2 other keys per document, 32 new tokens, 256 rows decoded together); extra FLAGS go to
    # every training.
    root="${CAPACITY_DIR:-outputs/capacity}"
    read -r -a docs_list <<<"${CAPACITY_DOCS:-10 50 200}"
    read -r -a entries_list <<<"${CAPACITY_ENTRIES:-32 256}"
    read -r -a kinds <<<"${CAPACITY_METHODS:-keyed shared lora}"
    check_methods CAPACITY_METHODS "${kinds[@]}"
    mkdir -p "$root"
    extra=("$@")
    capacity_job() {  # one run, named KIND_mENTRIES_nDOCS: its training, then its evaluation
      local kind="${1%_m*}" rest="${1##*_m}"
      local m="${rest%_n*}" n="${rest#*_n}" lr="${CAPACITY_LR:-3e-3}"
      if [[ "$kind" == lora* ]]; then lr="${CAPACITY_LORA_LR:-$lr}"; fi
      # shellcheck disable=SC2086  # EVAL_ARGS are meant to split into words
      "$PYTHON" train_guidance.py --lm_name smollm2 --lm_size 135m --dataset synthetic \
          --synthetic_articles "$n" --max_labels "$n" --max_segments "${CAPACITY_SEGMENTS:-2}" --segment_length 48 \
          --max_length 96 --key_dim 2 --key_activation tanh --hook_memory_dim "$m" --hook_memory_layer 27 \
          --negative_key_type other --target_negative_ce 4.5 --guidance 0.1 --batch_size 16 \
          --docs_per_step "$(( n < 4 ? n : 4 ))" --lr "$lr" --num_epochs "${CAPACITY_EPOCHS:-50}" \
          --save_freq "${CAPACITY_EPOCHS:-50}" --seed 1 --document_memory "$kind" --save_dir "$root/$1" "${extra[@]}" \
        && "$PYTHON" evaluate_memory.py --run_dir "$root/$1" ${EVAL_ARGS:---grid 0 --max_other_keys 2 --new_tokens 32 --gen_batch_size 256}
    }
    names=()
    for n in "${docs_list[@]}"; do
      for m in "${entries_list[@]}"; do
        for kind in "${kinds[@]}"; do names+=("${kind}_m${m}_n${n}"); done
      done
    done
    runs=(); failed=0
    sweep "${CAPACITY_JOBS:-1}" capacity_job "${names[@]}" || failed=$?
    "$PYTHON" -m benchmarks.capacity_report --out "$root/report" "${runs[@]}"
    exit "$failed"
    ;;
  scale)
    # Capacity past the paper, cell by cell: each method of SCALE_METHODS ("keyed shared lora") on each of
    # SCALE_DOCS ("100 300 1000") fictional articles (--dataset synthetic), SCALE_SEGMENTS (1) segment of 48 words
    # each, SmolLM2-135M. The keyed memory's entries and key_dim grow with the documents N from the paper's 32 and
    # 2 at 10 documents, both as sqrt(N / 10): entries round(32 sqrt(N/10)), key_dim ceil(2 sqrt(N/10)), the
    # entries lowered while the memory's trainable parameters (576^2 + 2*576 + entries * (2*576 + key_dim + 2)
    # on SmolLM2-135M) exceed 1 M (scale_shape); the shared memory and LoRA (rank matched to the keyed memory's
    # parameters, at least 1) get the same flags. Every cell makes 16 documents' steps (--docs_per_step 16, all
    # documents below 16) for SCALE_EPOCHS epochs (default max(3, 3000 / N): about 200 steps in every cell,
    # which keeps its training near half an hour on a 2-core CPU at 1,000 documents), at SCALE_LR (3e-3;
    # SCALE_LORA_LR for LoRA). Each cell is one training and its evaluation (evaluate_memory.py; default EVAL_ARGS
    # linear in N: 1 other key in generation, the CE under the own key and 4 drawn others, the texts of 10
    # documents attributed against every key) in SCALE_DIR/<kind>_n<N> (outputs/scale) with its log: a cell whose newest run has
    # eval/summary.json is skipped, one trained but not evaluated is only evaluated, so a cut-off sweep goes on
    # where it stopped. Then python -m benchmarks.capacity_report joins every cell of the grid and any other in
    # SCALE_DIR (the missing ones marked) into SCALE_DIR/report: recall, CE, attribution top-1 and bits stored per
    # trainable parameter. One cell: SCALE_DOCS=1000 SCALE_METHODS=keyed bash run.sh scale. SCALE_JOBS (1) cells
    # at once; extra FLAGS go to every training.
    root="${SCALE_DIR:-outputs/scale}"
    read -r -a docs_list <<<"${SCALE_DOCS:-100 300 1000}"
    read -r -a kinds <<<"${SCALE_METHODS:-keyed shared lora}"
    check_methods SCALE_METHODS "${kinds[@]}"
    for n in "${docs_list[@]}"; do
      if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "run.sh: SCALE_DOCS holds '$n': each must be a positive whole number of documents" >&2
        exit 2
      fi
    done
    mkdir -p "$root"
    extra=("$@")
    scale_shape() {  # N -> "ENTRIES KEY_DIM": both as sqrt(N / 10) from (32, 2), the memory kept to 1 M parameters
      awk -v n="$1" 'BEGIN { d = 576; r = sqrt(n / 10); m = int(32 * r + 0.5); k = int(2 * r); if (k < 2 * r) k++
        if (m < 1) m = 1; if (k < 1) k = 1
        while (m > 1 && d * d + 2 * d + m * (2 * d + k + 2) > 1000000) m--
        print m, k }'
    }
    newest_run() {  # a cell folder's highest run_N (nothing when it has none)
      local best=-1 dir i
      for dir in "$1"/run_*; do
        i="${dir##*/run_}"
        if [[ -d "$dir" && "$i" =~ ^[0-9]+$ ]] && (( i > best )); then best="$i"; fi
      done
      if (( best >= 0 )); then echo "$1/run_$best"; fi
    }
    scale_job() {  # one cell, named KIND_nDOCS: its training (unless done), then its evaluation
      local kind="${1%_n*}" n="${1##*_n}" lr="${SCALE_LR:-3e-3}" shape m k epochs run
      shape="$(scale_shape "$n")"; m="${shape% *}"; k="${shape#* }"
      epochs="${SCALE_EPOCHS:-$(( 3000 / n > 3 ? 3000 / n : 3 ))}"
      if [[ "$kind" == lora* ]]; then lr="${SCALE_LORA_LR:-$lr}"; fi
      run="$(newest_run "$root/$1")"
      if [[ -n "$run" && -f "$run/summary.json" ]]; then
        echo "=== $1: $run trained already, evaluating it"
      else
        "$PYTHON" train_guidance.py --lm_name smollm2 --lm_size 135m --dataset synthetic \
            --synthetic_articles "$n" --max_labels "$n" --max_segments "${SCALE_SEGMENTS:-1}" --segment_length 48 \
            --max_length 96 --key_dim "$k" --key_activation tanh --hook_memory_dim "$m" --hook_memory_layer 27 \
            --negative_key_type other --target_negative_ce 4.5 --guidance 0.1 --batch_size 16 \
            --docs_per_step "$(( n < 16 ? n : 16 ))" --lr "$lr" --num_epochs "$epochs" --save_freq "$epochs" \
            --seed 1 --document_memory "$kind" --save_dir "$root/$1" "${extra[@]}" || return $?
      fi
      # shellcheck disable=SC2086  # EVAL_ARGS are meant to split into words
      "$PYTHON" evaluate_memory.py --run_dir "$root/$1" ${EVAL_ARGS:---grid 0 --max_other_keys 1 --new_tokens 32 \
          --gen_batch_size 256 --ce_other_keys 4 --attribution_docs 10}
    }
    names=(); todo=()
    for n in "${docs_list[@]}"; do
      for kind in "${kinds[@]}"; do
        names+=("${kind}_n${n}")
        run="$(newest_run "$root/${kind}_n${n}")"
        if [[ -n "$run" && -f "$run/eval/summary.json" ]]; then
          echo "=== scale ${kind}_n${n}: done ($run/eval/summary.json), skipped" >&2
        else
          todo+=("${kind}_n${n}")
        fi
      done
    done
    runs=(); failed=0
    if (( ${#todo[@]} )); then sweep "${SCALE_JOBS:-1}" scale_job "${todo[@]}" || failed=$?; fi
    report=()
    for name in "${names[@]}"; do report+=("$root/$name"); done
    for dir in "$root"/*_n*; do  # cells of other grids run into the same folder
      if [[ -d "$dir" && ! " ${report[*]} " == *" $dir "* ]]; then report+=("$dir"); fi
    done
    "$PYTHON" -m benchmarks.capacity_report --out "$root/report" "${report[@]}"
    exit "$failed"
    ;;
  *)
    echo "run.sh: unknown preset '$preset' (allowed: paper, demo, ablations, smollm2, capacity, scale, compare)" >&2
    exit 2
    ;;
esac
