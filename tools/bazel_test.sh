#!/usr/bin/env bash
# `make bazel-test`: runs every test target (`bazel test //...`) with Debian's bazel-bootstrap
# 4.2.3, fully offline, against the project's virtualenv (.venv, from `make venv`).
#
# Installs bazel-bootstrap with apt when `bazel` is missing (needs root or sudo; CI machines are
# fresh). Test results are never cached (Bazel does not see changes inside .venv), and the Bazel
# server is shut down at the end so nothing keeps running.
#
# Arguments are test targets (default `//...`). Every target is built first either way, so
#   bash tools/bazel_test.sh //:build_file_test //:schedules_test
# is a cheap check that the whole BUILD file is valid plus a couple of real tests.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

if ! command -v bazel >/dev/null 2>&1; then
  echo "bazel_test.sh: bazel not found; installing Debian's bazel-bootstrap" >&2
  if [[ "$(id -u)" -eq 0 ]]; then
    sudo_cmd=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "bazel_test.sh: need root or sudo to run 'apt-get install bazel-bootstrap'" >&2
    exit 2
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bazel_test.sh: no apt-get; install Bazel 4.x yourself (Debian: bazel-bootstrap)" >&2
    exit 2
  fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq bazel-bootstrap >/dev/null
fi

if [[ ! -x .venv/bin/python3 ]]; then
  echo "bazel_test.sh: no virtualenv at .venv; run 'make venv' first" >&2
  exit 2
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(//...)
fi

# Shut the server down however the test run ends (failure, Ctrl-C).
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT

start=${SECONDS}
status=0
# Building //... checks every target (missing files, bad labels, dependency cycles) even when only
# some tests run; for py_* targets it only lays out runfiles, a few seconds.
bazel build //... || status=$?
if [[ ${status} -eq 0 ]]; then
  bazel test --nocache_test_results "${targets[@]}" || status=$?
fi
elapsed=$((SECONDS - start))
if [[ ${status} -eq 0 ]]; then
  echo "bazel_test.sh: PASSED (${targets[*]}) in ${elapsed}s"
else
  echo "bazel_test.sh: FAILED with exit code ${status} (${targets[*]}) after ${elapsed}s" >&2
fi
exit "${status}"
