# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run); the caller sets PROG.

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

truthy() {
  case "${1:-0}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac
}

quote() {
  local s=$1 safe='^[-A-Za-z0-9_@%+=:,./]+$'
  if [[ -n $s && $s =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
