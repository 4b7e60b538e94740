# Sourced by the launch scripts: shell quoting and --dry-run execution.
# (launch/slurm.sbatch keeps its own copy: SLURM runs a spooled copy of it, away from this file.)

# One argument as a POSIX shell word: as is when safe, else single-quoted (' becomes '\'').
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# The arguments as one command line that a shell (or Python's shlex.split) parses back into them.
quote_all() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

# Run a command, or with DRY_RUN=1 print it (exactly, quoted) instead.
run_or_print() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then quote_all "$@"; echo; else "$@"; fi
}
