#!/usr/bin/env bash
# Install CRIU >= 4.2 into a private prefix (default ./.criu, or $UNDERSTUDY_CRIU_PREFIX) for
# `understudy snapshot`. Nothing is installed system-wide and the machine's apt state is not touched.
#
# Why not the distribution's criu: CRIU 4.1 cannot dump a process holding an AF_INET socket on
# kernels >= 6.16, and Debian bookworm's 3.17 fails `criu check` on kernels >= 6.13. Debian's `sid`
# suite has 4.2.1; it needs libraries from a newer Debian (glibc >= 2.38). So:
#   1. `apt-get download` criu and the libraries it needs (resolved by apt, as the suite has them)
#      through a private sources list: suite sid, the mirror taken from this machine's own apt
#      sources (or $UNDERSTUDY_CRIU_MIRROR), private lists and cache;
#   2. `dpkg-deb -x` them into $PREFIX/root (glibc apart, into $PREFIX/glibc);
#   3. write $PREFIX/bin/criu, a wrapper that runs criu with the bundled libraries. On hosts whose
#      glibc is older than criu needs it starts criu through a private copy of the bundled loader
#      ($PREFIX/lib/ld-criu.so): a restored process that maps the very loader file criu runs from
#      makes the restore fail with EBUSY.
#
# The prefix is relocatable (the wrapper finds its files next to itself): a prefix made on a Debian
# host can be carried to a host without a Debian mirror (the GPU machine runs Ubuntu) and used as it is.
#
# Privileges: CRIU needs root (or CAP_SYS_ADMIN + CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE and
# friends). As root the wrapper runs criu as it is; otherwise it uses `sudo -n` when passwordless
# sudo works, and says so when it does not.
#
# Idempotent: an existing prefix whose criu reports the wanted version is kept (FORCE=1 redoes it).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${UNDERSTUDY_CRIU_PREFIX:-$PWD/.criu}
SUITE=${UNDERSTUDY_CRIU_SUITE:-sid}
WANT=${UNDERSTUDY_CRIU_VERSION:-4.2}

version_ge() {  # version_ge A B: A >= B (dotted numbers)
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -t. -k1,1n -k2,2n -k3,3n | head -1)" = "$2" ]
}

if [ "${FORCE:-0}" != 1 ] && [ -x "$PREFIX/bin/criu" ]; then
  have=$("$PREFIX/bin/criu" --version 2>/dev/null | sed -n 's/^Version: //p')
  if [ -n "$have" ] && version_ge "$have" "$WANT"; then
    echo "criu $have already in $PREFIX"
    exit 0
  fi
fi

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)

# The Debian mirror this machine already uses (deb822 .sources or one-line .list files).
mirror=${UNDERSTUDY_CRIU_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | sed -n -e 's/^URIs:[[:space:]]*//p' \
             -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]\{1,\}\).*/\2/p' \
    | tr ' ' '\n' | grep -E '^https?://[^[:space:]]+/debian/?$' | head -1 || true)
fi
if [ -z "$mirror" ]; then
  echo "install-criu: no Debian mirror in this machine's apt sources; set UNDERSTUDY_CRIU_MIRROR, or make the" \
       "prefix on a Debian host and carry it here (it is relocatable)" >&2
  exit 1
fi
keyring=${UNDERSTUDY_CRIU_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
[ -r "$keyring" ] || { echo "install-criu: no Debian archive keyring at $keyring" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/criu-install.XXXXXX")
trap 'rm -rf "$work" "$PREFIX.new"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb [signed-by=$keyring] $mirror $SUITE main" > "$work/sources.list"
APT=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::status=/dev/null
     -o "APT::Architecture=$arch" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
echo "install-criu: criu from $SUITE ($mirror) into $PREFIX"
apt-get "${APT[@]}" -qq update
# criu and the libraries it needs, as the suite has them today (sid moves: no list is written down).
packages=$(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
             --no-replaces --no-enhances criu | grep -v -e '^ ' -e '^<' | sort -u)
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get "${APT[@]}" -qq download $packages)

rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new/root" "$PREFIX.new/glibc" "$PREFIX.new/bin" "$PREFIX.new/lib"
for deb in "$work"/debs/*.deb; do
  case "$(basename "$deb")" in
    libc6_*) dpkg-deb -x "$deb" "$PREFIX.new/glibc" ;;  # apart: used only where the host's is too old
    *) dpkg-deb -x "$deb" "$PREFIX.new/root" ;;
  esac
done
[ -x "$PREFIX.new/root/usr/sbin/criu" ] || { echo "install-criu: no usr/sbin/criu in the criu package" >&2; exit 1; }
libdir=$(cd "$PREFIX.new/glibc" && ls -d usr/lib/*-linux-gnu | head -1)
cp -L "$PREFIX.new/glibc/$libdir"/ld-linux*.so.* "$PREFIX.new/lib/ld-criu.so"  # the private copy (see above)
chmod 755 "$PREFIX.new/lib/ld-criu.so"
# The newest glibc symbol version that criu and its libraries ask for (version names are plain strings).
need=$(find "$PREFIX.new/root/usr/sbin/criu" "$PREFIX.new/root/$libdir" -type f -print0 \
       | xargs -0 grep -haoE 'GLIBC_2\.[0-9]+' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -u | tail -1)
deb=$(cd "$work/debs" && ls criu_*.deb)

cat > "$PREFIX.new/bin/criu" <<EOF
#!/bin/sh
# $deb from Debian $SUITE with its own libraries, made by scripts/install-criu.sh.
# Relocatable: every path is found from this file's place.
here=\$(cd "\$(dirname "\$0")/.." && pwd)
libs="\$here/root/$libdir"
run=""
if [ "\$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then
    run="sudo -n"
  else
    echo "criu: needs root (or CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE...); no passwordless sudo here" >&2
  fi
fi
# criu needs glibc >= $need: older hosts run it through the bundled loader and glibc.
host=\$(getconf GNU_LIBC_VERSION 2>/dev/null | sed 's/^glibc //')
low=\$(printf '%s\n%s\n' "\$host" "$need" | sort -t. -k1,1n -k2,2n | head -1)
if [ -z "\$host" ] || [ "\$low" != "$need" ]; then
  exec \$run "\$here/lib/ld-criu.so" --library-path "\$here/glibc/$libdir:\$libs" "\$here/root/usr/sbin/criu" "\$@"
fi
exec \$run env LD_LIBRARY_PATH="\$libs" "\$here/root/usr/sbin/criu" "\$@"
EOF
chmod 755 "$PREFIX.new/bin/criu"
rm -rf "$PREFIX"
mv "$PREFIX.new" "$PREFIX"
echo "install-criu: $("$PREFIX/bin/criu" --version | head -1) in $PREFIX (glibc >= $need needed; host: $(getconf GNU_LIBC_VERSION))"
