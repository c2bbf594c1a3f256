# Sourced by the launch scripts: dry-run support and error messages, written once.
#
#   step CMD ARG...   runs the command, or with DRY_RUN=1 prints it (shell-quoted, so the
#                     printed line can be pasted into a shell) and runs nothing.
#   die MESSAGE       prints `error: MESSAGE` to stderr and exits 2.
#   shell_quote ARG...  the arguments as one shell-quoted line.

die() {
  echo "error: $*" >&2
  exit 2
}

# Readable quoting: words made only of safe characters stay as they are, anything else is
# single-quoted (unlike `printf %q`, which escapes every comma and space with a backslash).
shell_quote() {
  local out=() word prefix
  for word in "$@"; do
    prefix=''
    if [[ "${word}" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      # --flag='a value' rather than '--flag=a value': the same word, easier to read.
      prefix="${BASH_REMATCH[1]}"
      word="${BASH_REMATCH[2]}"
    fi
    if [[ -n "${word}" && "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("${prefix}${word}")
    else
      out+=("${prefix}'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

step() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

# The comment block at the top of script $1 (after the #! line), as its --help text.
print_header() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}
