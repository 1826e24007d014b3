#!/usr/bin/env bash
# Installs the official MCP SDK clients the tests drive through the server
# layer (tests/server_sdk_clients.rs): Python `mcp` 1.x and 2.x in virtual
# environments and the TypeScript SDK, under target/sdk. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
sdk=target/sdk
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1 \
   || ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq python3-venv nodejs npm) || {
    echo "ERROR: python3-venv, node and npm are required for the SDK client tests" >&2
    exit 1
  }
fi
for pin in "py-mcp1 mcp==1.30.0" "py-mcp2 mcp==2.3.0"; do
  set -- $pin
  if ! "$sdk/$1/bin/python" -c "import mcp" >/dev/null 2>&1; then
    python3 -m venv "$sdk/$1"
    "$sdk/$1/bin/pip" install -q "$2"
  fi
done
if [ ! -d "$sdk/ts/node_modules/@modelcontextprotocol/sdk" ]; then
  mkdir -p "$sdk/ts"
  (cd "$sdk/ts" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund @modelcontextprotocol/sdk@1.32.2)
fi
