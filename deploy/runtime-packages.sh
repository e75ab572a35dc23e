#!/bin/sh
# Prints the Debian packages that own the shared libraries the given binaries
# load, one a line, sorted. The image build runs it in the build stage and the
# runtime stage installs exactly that list, so a runtime image carries the
# libraries its binary needs and nothing it was only built with.
#
# Usage: runtime-packages.sh [--allow-missing SONAME]... [--skip-prefix DIR]... FILE...
#   --allow-missing  a library that may be absent at build time (the CUDA
#                    driver's libcuda.so.1 comes from the host at run time)
#   --skip-prefix    libraries under DIR come from no package (an unpacked
#                    LibTorch archive); the image copies that folder instead
# Exits 1 when a library is missing or owned by no package.
set -eu

allow_missing=""
skip_prefixes=""
while [ $# -gt 0 ]; do
  case "$1" in
    --allow-missing) allow_missing="$allow_missing $2"; shift 2 ;;
    --skip-prefix) skip_prefixes="$skip_prefixes ${2%/}"; shift 2 ;;
    --) shift; break ;;
    -*) echo "runtime-packages: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "usage: runtime-packages.sh [--allow-missing SONAME]... [--skip-prefix DIR]... FILE..." >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

# Every library path the loader resolves ("libfoo.so.1 => /path (0x...)"),
# and the loader itself (a line that starts with its absolute path).
for file in "$@"; do
  if [ ! -f "$file" ]; then
    echo "runtime-packages: $file does not exist" >&2
    status=1
    continue
  fi
  if ! ldd "$file" >"$work/ldd" 2>&1; then
    echo "runtime-packages: ldd $file failed:" >&2
    cat "$work/ldd" >&2
    status=1
    continue
  fi
  while read -r first arrow path _; do
    if [ "$arrow" = "=>" ] && [ "$path" = "not" ]; then
      case " $allow_missing " in
        *" $first "*) ;;
        *) echo "runtime-packages: $file needs $first, which is not installed" >&2
           status=1 ;;
      esac
    elif [ "$arrow" = "=>" ]; then
      echo "$path"
    else
      case "$first" in /*) echo "$first" ;; esac
    fi
  done <"$work/ldd" >>"$work/paths"
done
touch "$work/paths"
sort -u "$work/paths" -o "$work/paths"

# Drop what lives under a --skip-prefix.
for prefix in $skip_prefixes; do
  grep -v -F "$prefix/" "$work/paths" >"$work/kept" || true
  mv "$work/kept" "$work/paths"
done

# dpkg records a file under the path its package shipped it at; with Debian
# 12's merged /usr the loader may report /lib/... for a file dpkg knows as
# /usr/lib/... (or the reverse), and alternatives (libblas.so.3) are symlinks
# through /etc/alternatives to the real provider. Ask for every spelling in
# one dpkg-query call (one pass over its database instead of one per file).
while read -r path; do
  printf '%s\t%s\n' "$path" "$(readlink -f "$path")"
done <"$work/paths" >"$work/real"
awk -F '\t' '{
  for (i = 1; i <= 2; i++) {
    print $i
    if (substr($i, 1, 5) == "/usr/") print substr($i, 5); else print "/usr" $i
  }
}' "$work/real" | sort -u >"$work/candidates"

# Output lines look like "pkg[:arch][, pkg2[:arch]]: /path".
: >"$work/owners"
if [ -s "$work/candidates" ]; then
  xargs dpkg-query -S <"$work/candidates" 2>/dev/null >"$work/owners" || true
fi

# The first spelling dpkg knows names the owner(s).
awk -F '\t' -v owners="$work/owners" -v out="$work/packages" '
  BEGIN {
    while ((getline line < owners) > 0) {
      split_at = index(line, ": /")
      if (split_at == 0) continue
      owner[substr(line, split_at + 2)] = substr(line, 1, split_at - 1)
    }
  }
  function other(p) { return substr(p, 1, 5) == "/usr/" ? substr(p, 5) : "/usr" p }
  {
    n = split($1 "\t" $2 "\t" other($1) "\t" other($2), spellings, "\t")
    found = ""
    for (i = 1; i <= n && found == ""; i++) if (spellings[i] in owner) found = owner[spellings[i]]
    if (found == "") {
      print "runtime-packages: no Debian package owns " $1 > "/dev/stderr"
      missing = 1
      next
    }
    k = split(found, pkgs, ", ")
    for (j = 1; j <= k; j++) { sub(/:.*/, "", pkgs[j]); print pkgs[j] > out }
  }
  END { exit missing }
' "$work/real" || status=1

touch "$work/packages"
sort -u "$work/packages"
exit $status
