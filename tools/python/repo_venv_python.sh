#!/usr/bin/env bash
# Bazel's Python interpreter: the repository's virtualenv (created by `make venv`).
#
# Bazel runs this script through symlinks (runfiles tree, sandbox execroot); its real path is
# <repo>/tools/python/repo_venv_python.sh, so the virtualenv is found relative to that.
# TF_IDDPM_VENV (passed with --test_env / --action_env) overrides the location.
set -euo pipefail
repo_root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
venv="${TF_IDDPM_VENV:-${repo_root}/.venv}"
if [[ ! -x "${venv}/bin/python3" ]]; then
  echo "repo_venv_python.sh: no virtualenv at ${venv}; run 'make venv' first" >&2
  exit 2
fi
exec "${venv}/bin/python3" "$@"
