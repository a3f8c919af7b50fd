# Shared by scripts/cluster, scripts/test and scripts/bench. Source it; do not run it.

# apt_install PKG…: installs Debian packages (none given: does nothing).
apt_install() {
  (($#)) || return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing $* from Debian…" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Installs what the build and the tests need, if missing: etcd (Debian's etcd-server),
# protoc (protobuf-compiler; etcd-client compiles its protos) with the well-known types
# it imports (google/protobuf/*.proto, in libprotobuf-dev: protobuf-compiler only
# recommends it), curl, and cargo-nextest.
ensure_deps() {
  local need=()
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
  [ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  apt_install "${need[@]}"
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest…" >&2
    cargo install cargo-nextest --locked >&2
  fi
}

# Installs PostgreSQL's server programs, if missing: initdb, pg_ctl and postgres
# (Debian's postgresql; it puts them in /usr/lib/postgresql/VERSION/bin, not on PATH).
# The cluster tests start private servers with them (cluster-tests/src/postgres.rs).
ensure_postgres() {
  if command -v initdb && command -v pg_ctl && command -v postgres; then
    return 0
  fi >/dev/null 2>&1
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && return 0
  done
  apt_install postgresql
}

# A free TCP port on 127.0.0.1.
# Where cargo puts its build output: target/ unless CARGO_TARGET_DIR (or a cargo config)
# says otherwise. Binaries are found under it, never at a hard-coded path.
target_dir() {
  cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

# wait_for_line FILE PREFIX SECONDS: prints the first line of FILE starting with PREFIX.
wait_for_line() {
  local file=$1 prefix=$2 deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    if [ -f "$file" ]; then
      local line
      line=$(grep -m1 "^$prefix" "$file" || true)
      if [ -n "$line" ]; then
        echo "$line"
        return 0
      fi
    fi
    sleep 0.1
  done
  return 1
}

# Installs what the browser tests need, if missing: Debian's Chromium and the Node.js
# driver package (playwright-core, pinned in cluster-tests/browser/package-lock.json).
ensure_browser_deps() {
  local need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  apt_install "${need[@]}"
  if [ ! -d cluster-tests/browser/node_modules/playwright-core ] || [ ! -d cluster-tests/browser/node_modules/y-websocket ]; then
    echo "installing the browser driver (npm ci)…" >&2
    (cd cluster-tests/browser && npm ci --no-audit --no-fund >&2)
  fi
}

# Installs what the aioquic cluster test needs, if missing: a Python virtual environment
# at cluster-tests/quic/.venv with the packages of cluster-tests/quic/requirements.txt
# (aioquic, pinned), for the independent QUIC client cluster-tests/quic/aioquic_client.py.
ensure_python_quic() {
  local venv=cluster-tests/quic/.venv
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import aioquic' >/dev/null 2>&1; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
  echo "installing aioquic into $venv…" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r cluster-tests/quic/requirements.txt >&2
}

# Checks the deployment files in deploy/ with the tools that read them: the systemd
# units with `systemd-analyze verify` (as installed: the binaries built here are
# bind-mounted at /usr/local/bin in a mount namespace of the check's own, where
# ExecStart= finds them), and the Kubernetes manifests against the Kubernetes schemas
# (`kubernetes-validate --strict`, from PyPI, in deploy/.venv). Installs what is missing.
check_deploy() {
  command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
  local venv=deploy/.venv
  if ! { [ -x "$venv/bin/kubernetes-validate" ] && "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; }; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
    echo "installing kubernetes-validate into $venv…" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r deploy/requirements.txt >&2
  fi
  local bin
  bin="$(target_dir)/debug"
  # systemd-analyze verify only warns about some mistakes (an unknown key, say): any
  # word from it fails the check.
  local units=(deploy/systemd/*.service) root said
  root=$(mktemp -d)
  ln -s "$(cd "$bin" && pwd)/ringfeed-node" "$root/ringfeed-node"
  ln -s "$(cd "$bin" && pwd)/ringfeed-router" "$root/ringfeed-router"
  if unshare -m true 2>/dev/null; then
    said=$(unshare -m sh -c "mount --bind '$root' /usr/local/bin && systemd-analyze verify ${units[*]}" 2>&1) || said="${said:-systemd-analyze verify failed}"
  else
    # No mount namespace here: verify copies whose ExecStart= names the built binaries.
    local copy="$root/units"
    mkdir -p "$copy"
    for unit in "${units[@]}"; do
      sed "s#/usr/local/bin/#$root/#g" "$unit" > "$copy/$(basename "$unit")"
    done
    said=$(systemd-analyze verify "$copy"/*.service 2>&1) || said="${said:-systemd-analyze verify failed}"
  fi
  rm -rf "$root"
  if [ -n "$said" ]; then
    echo "systemd-analyze verify deploy/systemd/*.service:" >&2
    echo "$said" >&2
    return 1
  fi
  "$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 deploy/kubernetes/*.yaml
  "$venv/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/*.yaml
  echo "deployment files: systemd units and Kubernetes manifests check out" >&2
}

# Installs what the benchmarks' peers need, if missing: Redis (Debian's redis-server),
# Node.js, and the peers' npm packages (the seed reference's, Socket.IO's, and P9's —
# the y-websocket server, Hocuspocus and the stock Yjs clients —, pinned in their
# package-lock.json files).
ensure_bench_deps() {
  local need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  apt_install "${need[@]}"
  if [ ! -d bench/peers/seed-reference/node_modules/ioredis ]; then
    echo "installing the seed reference's packages (npm ci)…" >&2
    (cd bench/peers/seed-reference && npm ci --no-audit --no-fund >&2)
  fi
  if [ ! -d bench/peers/socketio/node_modules/@socket.io/redis-adapter ]; then
    echo "installing the Socket.IO peer's packages (npm ci)…" >&2
    (cd bench/peers/socketio && npm ci --no-audit --no-fund >&2)
  fi
  if [ ! -d bench/peers/docs/node_modules/@hocuspocus/server ]; then
    echo "installing P9's packages: y-websocket, Hocuspocus (npm ci)…" >&2
    (cd bench/peers/docs && npm ci --no-audit --no-fund >&2)
  fi
}
