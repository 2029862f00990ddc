#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), install clp-jax on every worker, start `clp-jax train`
# on all workers with one config, and stream the logs of worker 0.
#
#   scripts/tpu_vm_launch.sh create  --name NAME --zone ZONE --type v5litepod-16 [--version RUNTIME]
#   scripts/tpu_vm_launch.sh setup   --name NAME --zone ZONE [--repo URL_OR_DIR]
#   scripts/tpu_vm_launch.sh train   --name NAME --zone ZONE --config configs/FILE.yaml [-- key=value ...]
#   scripts/tpu_vm_launch.sh logs    --name NAME --zone ZONE
#   scripts/tpu_vm_launch.sh delete  --name NAME --zone ZONE
#   add --dry-run to print the gcloud commands instead of running them.
#
# Every worker runs the same command (`--worker=all`) with distributed.mode=on: jax.distributed.initialize
# finds the other hosts through the TPU metadata. A restart of `train` with the same run_dir resumes from
# the latest checkpoint (preemptions included).
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

cmd=${1:-}; [ -n "$cmd" ] || usage 2; shift
name="" zone="" type="v5litepod-8" version="v2-alpha-tpuv5-lite" repo="" config="" dry=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm_launch.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] || { echo "tpu_vm_launch.sh: --name and --zone are required" >&2; exit 2; }

run() {
  if [ "$dry" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$cmd" in
  create)
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$version"
    ;;
  setup)
    src=${repo:-$(git rev-parse --show-toplevel)}
    if [ -d "$src" ]; then  # copy the local checkout (without its venv) to every worker
      archive=$(mktemp -d)/clp-jax.tar.gz
      run tar -C "$src" --exclude=.venv --exclude=demo_out --exclude=runs -czf "$archive" .
      run gcloud compute tpus tpu-vm scp "$archive" "$name:~/clp-jax.tar.gz" --zone "$zone" --worker=all
      ssh_all 'mkdir -p ~/clp-jax && tar -C ~/clp-jax -xzf ~/clp-jax.tar.gz'
    else
      ssh_all "git clone $src ~/clp-jax"
    fi
    ssh_all 'cd ~/clp-jax && make install && .venv/bin/pip install -q "jax[tpu]==$(.venv/bin/python -c "import jax; print(jax.__version__)")"'
    ;;
  train)
    [ -n "$config" ] || { echo "tpu_vm_launch.sh: train needs --config FILE" >&2; exit 2; }
    overrides=$(printf '%q ' "${extra[@]+"${extra[@]}"}")
    ssh_all "cd ~/clp-jax && nohup .venv/bin/clp-jax train --config $config distributed.mode=on $overrides > ~/train.log 2>&1 &"
    run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 --command 'tail -n +1 -f ~/train.log'
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 --command 'tail -n 200 -f ~/train.log'
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *) echo "tpu_vm_launch.sh: unknown command $cmd" >&2; usage 2 ;;
esac
