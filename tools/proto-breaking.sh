#!/usr/bin/env bash
# Fails when the protos in proto/ break compatibility with those of a git revision (the
# first argument; `main` when none), by buf's FILE rules: a client built from the older
# protos must keep working against a service built from these.
#
# buf cannot read the older protos straight from git: they import google/api protos that
# are never committed (`make protodeps` copies them from the installed
# googleapis-common-protos package). So both versions are compiled to descriptor sets
# with those same imports, and buf compares the two sets. `make breaking` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

base=${1:-main}
VPY=.venv/bin/python
BUF=tools/node_modules/.bin/buf
PROTODEPS=build/protodeps

if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
  echo "proto-breaking: $base is not a revision of this repository" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/base"
git archive "$base" proto | tar -x -C "$work/base"

well_known=$("$VPY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

# compile ROOT OUT: every .proto under ROOT/proto into the descriptor set OUT.
compile() {
  local root=$1 out=$2
  local files
  files=$(cd "$root/proto" && find . -name '*.proto' | sed 's|^\./||' | sort)
  if [[ -z $files ]]; then
    echo "proto-breaking: no protos under $root/proto" >&2
    exit 2
  fi
  # shellcheck disable=SC2086 # one argument per file
  "$VPY" -m grpc_tools.protoc -I "$root/proto" -I "$PROTODEPS" -I "$well_known" \
    --include_imports --descriptor_set_out="$out" $files
}

compile "$work/base" "$work/base.binpb"
compile . "$work/head.binpb"

config='{"version":"v2","breaking":{"use":["FILE"]}}'
"$BUF" breaking "$work/head.binpb" --against "$work/base.binpb" --config "$config"
echo "proto-breaking: the protos keep compatibility with $base"
