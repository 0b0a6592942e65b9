#!/bin/bash
# Shared by train.sbatch and two_stage.sh (sourced): what both need to agree on.

# Cores one rank needs: its process plus one per DataLoader worker (a worker decodes with one
# thread). ARGS: the key=value overrides; model.data.num_workers defaults to conf/data's 4.
avllm_cpus_per_task() {
  local workers=4 arg
  for arg in "$@"; do
    case $arg in model.data.num_workers=*) workers=${arg#model.data.num_workers=} ;; esac
  done
  case $workers in ''|*[!0-9]*) echo "model.data.num_workers=$workers is not a number" >&2; return 2 ;; esac
  echo $((workers + 1))
}

# A container path as this host sees it, through CONTAINER_MOUNTS (host:container[,...]).
avllm_host_path() {
  local path=$1 best_host='' best_in='' m host inside
  local -a entries
  IFS=, read -ra entries <<< "${CONTAINER_MOUNTS:-}"
  for m in "${entries[@]}"; do
    host=${m%%:*}; inside=${m#*:}; inside=${inside%%:*}
    if [ "$path" = "$inside" ] || [ "${path#"${inside%/}"/}" != "$path" ]; then
      if [ ${#inside} -gt ${#best_in} ]; then best_host=$host; best_in=$inside; fi
    fi
  done
  if [ -n "$best_in" ]; then echo "$best_host${path#"$best_in"}"; else echo "$path"; fi
}

# KEY VALUE: an absolute path that this host could see (its top folder exists here) must exist.
avllm_check_path() {
  local key=$1 value=$2 host top
  case $value in /*) ;; *) return 0 ;; esac
  host=$(avllm_host_path "$value")
  top="/$(cut -d/ -f2 <<< "$host")"
  if [ -e "$top" ] && [ ! -e "$host" ]; then
    echo "error: $key=$value does not exist on this host ($host); fix the path or CONTAINER_MOUNTS" >&2
    return 1
  fi
}
