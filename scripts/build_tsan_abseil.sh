#!/usr/bin/env bash
# Builds Debian's own Abseil (the source package of the installed
# libabsl-dev, with Debian's patches: same version, options and SONAMEs)
# with clang-15's ThreadSanitizer into PREFIX, for the tsan preset. Debian ships Abseil uninstrumented, so
# TSan cannot see absl::Mutex's happens-before edges, in our code or in
# gRPC's (gRPC locks through absl::Mutex); with this build loaded in place
# of the system copy (LD_LIBRARY_PATH) it can.
#
# apt runs with a private state folder: no root and no change to the
# machine's package sources.
#
#   scripts/build_tsan_abseil.sh PREFIX
set -euo pipefail
prefix=$(realpath -m "$1")
if [[ -f $prefix/.complete ]]; then
  exit 0
fi
scripts_dir=$(dirname "$0")
"$scripts_dir/install_packages.sh" dpkg-dev ninja-build clang-15
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/sources.list.d"
# The machine's binary package sources, as source package sources.
for sources in /etc/apt/sources.list.d/*.sources; do
  sed 's/^Types: deb$/Types: deb-src/' "$sources" >"$work/sources.list.d/$(basename "$sources")"
done
if [[ -f /etc/apt/sources.list ]]; then
  sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$work/sources.list"
else
  : >"$work/sources.list"
fi
apt_options=(-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
  -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/sources.list.d"
  -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)")
apt-get "${apt_options[@]}" -qq update
version=$(dpkg-query -W -f='${Version}' libabsl-dev)
(cd "$work" && apt-get "${apt_options[@]}" -qq source --download-only "abseil=$version" &&
  dpkg-source -x ./*.dsc source >/dev/null 2>&1)
# Debian's configuration (debian/rules): C++17, shared libraries.
cmake -S "$work/source" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang-15 -DCMAKE_CXX_COMPILER=clang++-15 \
  -DCMAKE_CXX_STANDARD=17 -DABSL_PROPAGATE_CXX_STD=ON -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_CXX_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread \
  -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
cmake --build "$work/build" -j "$(nproc)" >/dev/null
cmake --install "$work/build" >/dev/null
touch "$prefix/.complete"
echo "Abseil $version with ThreadSanitizer in $prefix"
