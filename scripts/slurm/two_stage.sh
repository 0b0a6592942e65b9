#!/bin/bash
# Stage 1 then stage 2 as two SLURM jobs; stage 2 starts when stage 1 succeeded (afterok) and
# restores from stage 1's run folder (its last checkpoint). Runs on a login node, from the repo root.
#
#   CONTAINER_IMAGE=/lustre/images/nemo_avllm.sqsh CONTAINER_MOUNTS=/lustre:/lustre \
#   SBATCH_ACCOUNT=ACCT SBATCH_PARTITION=batch STAGE1_NODES=4 STAGE2_NODES=4 \
#     scripts/slurm/two_stage.sh /lustre/avllm/runs model.tokenizer=/lustre/hf/vicuna-7b-v1.5 \
#       stage1.model.data.train_manifest=/lustre/data/desc.jsonl stage1.model.restore_from=/lustre/avllm/vicuna7b \
#       stage2.model.data.train_manifest=/lustre/data/inst.jsonl
#
# key=value goes to both stages, stage1.key=value / stage2.key=value to one (as `avllm launch`).
# sbatch reads SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_TIMELIMIT, ... from the environment.
# Nothing is submitted unless CONTAINER_IMAGE, the tokenizer, stage 1's restore_from and both
# manifests are given, and every absolute path this host can see (through CONTAINER_MOUNTS) exists.
# Stage 2 starts only after stage 1 exited 0, which it does only at its last step or requeued.
set -euo pipefail
# shellcheck source=scripts/slurm/common.sh
source "$(dirname "$0")/common.sh"

exp_dir=${1:?usage: scripts/slurm/two_stage.sh EXP_DIR [key=value | stage1.key=value | stage2.key=value ...]}
shift
case $exp_dir in
  /*) ;;
  *) echo "EXP_DIR must be an absolute path on the shared file system, got $exp_dir" >&2; exit 2 ;;
esac
fail() { echo "two_stage.sh: error: $1" >&2; exit 2; }
[ -n "${CONTAINER_IMAGE:-}" ] || fail "CONTAINER_IMAGE is not set: the image built from this repo's Dockerfile (an enroot .sqsh file or a registry image)"
case $CONTAINER_IMAGE in
  /*) [ ! -e "/$(cut -d/ -f2 <<< "$CONTAINER_IMAGE")" ] || [ -e "$CONTAINER_IMAGE" ] || fail "CONTAINER_IMAGE=$CONTAINER_IMAGE does not exist" ;;
esac
script=$(dirname "$0")/train.sbatch
stage1=(exp_manager.exp_dir="$exp_dir")
stage2=(exp_manager.exp_dir="$exp_dir")
stage1_name=avllm_stage1_pretrain
for arg in "$@"; do
  case $arg in
    stage1.name=*) stage1_name=${arg#stage1.name=}; stage1+=("${arg#stage1.}") ;;
    stage1.*) stage1+=("${arg#stage1.}") ;;
    stage2.*) stage2+=("${arg#stage2.}") ;;
    *=*) stage1+=("$arg"); stage2+=("$arg") ;;
    *) echo "unexpected argument $arg: expected key=value, stage1.key=value or stage2.key=value" >&2; exit 2 ;;
  esac
done

# the last value of KEY among a stage's overrides
value_of() { local key=$1 v='' a; shift; for a in "$@"; do case $a in "$key"=*) v=${a#"$key"=} ;; esac; done; echo "$v"; }
for stage in 1 2; do
  if [ "$stage" = 1 ]; then args=("${stage1[@]}"); else args=("${stage2[@]}"); fi
  keys=(model.tokenizer model.data.train_manifest)
  if [ "$stage" = 1 ]; then keys+=(model.restore_from); fi
  for key in "${keys[@]}"; do
    v=$(value_of "$key" "${args[@]}")
    [ -n "$v" ] || fail "stage $stage: $key is not set (give $key=... or stage$stage.$key=...)"
    avllm_check_path "stage$stage.$key" "$v" || exit 2
  done
done
cpus1=$(avllm_cpus_per_task "${stage1[@]}")
cpus2=$(avllm_cpus_per_task "${stage2[@]}")

job1=$(sbatch --parsable --nodes="${STAGE1_NODES:-1}" --cpus-per-task="$cpus1" --job-name=avllm-stage1 "$script" stage1_pretrain "${stage1[@]}")
job1=${job1%%;*}
job2=$(sbatch --parsable --nodes="${STAGE2_NODES:-1}" --cpus-per-task="$cpus2" --job-name=avllm-stage2 --dependency=afterok:"$job1" \
  "$script" stage2_finetune model.restore_from="$exp_dir/$stage1_name" "${stage2[@]}")
echo "stage 1: job $job1 -> $exp_dir/$stage1_name"
echo "stage 2: job ${job2%%;*} (after $job1 succeeds) -> $exp_dir/avllm_stage2_finetune"
