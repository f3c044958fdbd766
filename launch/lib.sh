# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run); the caller sets PROG.

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# take OPT NEXT HAS_NEXT: --opt=value or --opt value; sets VALUE and SHIFT.
# shellcheck disable=SC2034  # the caller reads VALUE and SHIFT
take() {
  local opt=$1 has_next=$3
  if [[ $opt == *=* ]]; then
    VALUE=${opt#*=}
    SHIFT=1
  elif [[ $has_next == 1 ]]; then
    VALUE=$2
    SHIFT=2
  else
    die "${opt} needs a value"
  fi
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
