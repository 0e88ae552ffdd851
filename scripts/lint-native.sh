#!/usr/bin/env bash
# npm run lint:native: cppcheck over native/*.cc, every check enabled; any
# finding fails. Findings are fixed, or suppressed inline next to the line with
# a comment that says why (grep cppcheck-suppress native/).
#
# Node's and node-addon-api's headers are left out on purpose: cppcheck then
# treats N-API types as opaque. Given napi.h it reports every write into a JS
# typed array (out[0] = ...) as an unread local variable, since it cannot know
# that the array's memory outlives the handle; the checks on our own code are
# the same either way. missingIncludeSystem only says that much.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cppcheck >/dev/null; then
  echo "lint:native: cppcheck is not installed (Debian: apt-get install cppcheck)" >&2
  exit 1
fi
cppcheck --version
cppcheck --std=c++17 --language=c++ --enable=all --inline-suppr --error-exitcode=1 -q \
  --suppress=missingIncludeSystem \
  -D__linux__ -D__x86_64__ -D__GNUC__ -D_GNU_SOURCE \
  -DNAPI_VERSION=8 -DNAPI_DISABLE_CPP_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED \
  --template='{file}:{line}: {severity}: {id}: {message}' \
  native/*.cc
# C sources (helper executables), if any, as C.
shopt -s nullglob
c_files=(native/*.c)
if [ ${#c_files[@]} -gt 0 ]; then
  cppcheck --std=c11 --language=c --enable=all --inline-suppr --error-exitcode=1 -q \
    --suppress=missingIncludeSystem -D__linux__ -D__x86_64__ -D__GNUC__ -D_GNU_SOURCE \
    --template='{file}:{line}: {severity}: {id}: {message}' "${c_files[@]}"
fi
echo "lint:native: cppcheck clean ($(ls native/*.cc native/*.c 2>/dev/null | wc -l) files)"
