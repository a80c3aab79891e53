#!/bin/bash
# Build just enough of PostgreSQL's own test suite (pg_regress, regress.so) to run
# `make installcheck-parallel` against an installed server, from the Debian source
# package of the installed postgresql-15. Needs deb-src and the build dependencies
# (`make deps-system`). Idempotent: a finished build is marked by DIR/.built.
#   scripts/regression-build.sh DIR
set -euo pipefail
dir=${1:?usage: regression-build.sh DIR}
[ -e "$dir/.built" ] && exit 0
mkdir -p "$dir"
cd "$dir"
if ! ls -d postgresql-15-*/ >/dev/null 2>&1; then
  # the installed version first (the mirror may not hold the newest security release)
  version=$(dpkg-query -W -f '${Version}' postgresql-15 2>/dev/null || true)
  apt-get source --download-only "postgresql-15${version:+=$version}" ||
    apt-get source --download-only postgresql-15
  dpkg-source --no-check -x postgresql-15_*.dsc
fi
src=$(ls -d postgresql-15-*/ | head -1)
cd "$src"
[ -e config.status ] || ./configure --without-readline --without-icu --without-llvm \
  --with-pgport=5432 >configure.log 2>&1 || { tail -40 configure.log >&2; exit 1; }
# PostgreSQL's make generates its headers (utils/errcodes.h, ...) only when it is the
# top-level make (MAKELEVEL 0). Run from `make test-slow`, it would inherit the outer
# make's MAKELEVEL and MAKEFLAGS (with its jobserver): clear them, and build the
# generated headers first, explicitly.
unset MAKELEVEL MAKEFLAGS MFLAGS
{ make -C src/backend generated-headers &&
  make -j2 -C src/test/regress all; } >build.log 2>&1 || { tail -60 build.log >&2; exit 1; }
touch "$dir/.built"
