# Shell functions the cluster benchmarks share (sourced, not run). They need CLUSTER_DIR (the
# scripts/cluster.sh directory) and BASE_PORT.

# Samples every process of the cluster (and the extra "name=pid[:metrics_url]" arguments) once
# a second into $CLUSTER_DIR/timeline-NAME.txt (scripts/timeline.py: CPU per process, the
# storage engines' flushes and compactions); prints the sampler's pid.
start_timeline() { # name [extra ...]
  local args=() name f out="$CLUSTER_DIR/timeline-$1.txt"
  shift
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    name="$(basename "$f" .pid)"
    case "$name" in
      s[1-3]) args+=("$name=$(cat "$f"):http://127.0.0.1:$((BASE_PORT + ${name#s} + 1000))/metrics") ;;
      *) args+=("$name=$(cat "$f")") ;;
    esac
  done
  python3 scripts/timeline.py "$out" "${args[@]}" "$@" >/dev/null 2>&1 &
  echo $!
}
