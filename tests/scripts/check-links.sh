#!/usr/bin/env bash
# The documents' relative links: every `](target)` of README.md, ARCHITECTURE.md, docs/*.md and
# fixtures/README.md that is not http(s) must name a file or folder of the repository, and a
# `#fragment` must name a heading of that Markdown file (GitHub's anchors: lowercase, spaces to
# hyphens, punctuation dropped). Links inside code blocks and inline code are not links. Prints
# each broken link and exits 1; exits 0 when all resolve. Run from anywhere; CI runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export LC_ALL=C.UTF-8

# The anchors of a Markdown file's headings, one a line (headings inside code blocks excluded).
anchors() {
  awk '/^[[:space:]]*```/ { fence = !fence; next } !fence && /^#+ / { sub(/^#+ +/, ""); print }' "$1" |
    tr '[:upper:]' '[:lower:]' |
    sed -E 's/[^[:alnum:] _-]//g; s/ /-/g'
}

# The link targets of a Markdown file, one a line (code blocks and inline code removed).
targets() {
  awk '/^[[:space:]]*```/ { fence = !fence; next } !fence' "$1" |
    sed -E 's/`[^`]*`//g' |
    grep -oE '\]\([^) ]+\)' |
    sed -E 's/^\]\(//; s/\)$//' || true
}

docs=(README.md ARCHITECTURE.md docs/*.md fixtures/README.md)
broken=0
checked=0
for doc in "${docs[@]}"; do
  [ -f "$doc" ] || continue
  dir=$(dirname "$doc")
  while IFS= read -r target; do
    [ -n "$target" ] || continue
    case $target in
      http://* | https://* | mailto:*) continue ;;
    esac
    checked=$((checked + 1))
    path=${target%%#*}
    fragment=
    if [[ $target == *"#"* ]]; then fragment=${target#*#}; fi
    if [ -z "$path" ]; then file=$doc; else file=$dir/$path; fi
    if [ ! -e "$file" ]; then
      echo "$doc: ($target): $file does not exist" >&2
      broken=$((broken + 1))
      continue
    fi
    if [ -n "$fragment" ] && [[ $file == *.md ]]; then
      if ! anchors "$file" | grep -qxF -- "$fragment"; then
        echo "$doc: ($target): $file has no heading #$fragment" >&2
        broken=$((broken + 1))
      fi
    fi
  done < <(targets "$doc")
done

if [ "$broken" -gt 0 ]; then
  echo "check-links: $broken broken of $checked relative links" >&2
  exit 1
fi
echo "check-links: $checked relative links, all resolve"
