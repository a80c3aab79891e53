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
# A parallel make can race on the generated headers of a fresh tree: one serial retry.
make -j2 -C src/test/regress all >build.log 2>&1 ||
  make -C src/test/regress all >>build.log 2>&1 || { tail -60 build.log >&2; exit 1; }
touch "$dir/.built"
