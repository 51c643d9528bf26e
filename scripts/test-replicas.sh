#!/usr/bin/env bash
# Two `nibble serve` replicas behind nginx on loopback, driven with the
# official `openai` Python client: checks that a session (X-Session-Id)
# always lands on the same replica, that sessions spread over both, that
# streaming passes through unbuffered, and that the sessions of a stopped
# replica fail over to the other one. Bounded in time and requests; stops
# everything it started on exit. Not part of scripts/test.sh.
#
#   scripts/test-replicas.sh [MODEL.nbl]
#
# Env: NIBBLE (default target/release/nibble, else target/fasttest/nibble),
# NIBBLE_TOOLS (next to it), MODEL. Without a model it converts the tiny
# fixture (tests/fixtures/tiny/tiny-gqa-small) with a ChatML template added.
# Installs nginx (apt-get) and the openai module (pip) only if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[test-replicas] $*" >&2; }

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    log "installing nginx"
    apt-get update -qq && apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! python3 -c "import openai" 2>/dev/null; then
    log "installing the openai module"
    pip install -q openai
fi

if [ -z "${NIBBLE:-}" ]; then
    if [ -x target/release/nibble ]; then NIBBLE=target/release/nibble
    elif [ -x target/fasttest/nibble ]; then NIBBLE=target/fasttest/nibble
    else
        log "building nibble"
        cargo build --profile fasttest --bin nibble --bin nibble-tools
        NIBBLE=target/fasttest/nibble
    fi
fi
NIBBLE_TOOLS=${NIBBLE_TOOLS:-$(dirname "$NIBBLE")/nibble-tools}

DIR=$(mktemp -d /tmp/nibble-replicas.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ]; then
        log "logs kept in $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

MODEL=${1:-${MODEL:-}}
if [ -z "$MODEL" ]; then
    [ -x "$NIBBLE_TOOLS" ] || cargo build --profile fasttest --bin nibble-tools
    [ -x "$NIBBLE_TOOLS" ] || NIBBLE_TOOLS=target/fasttest/nibble-tools
    cp -r tests/fixtures/tiny/tiny-gqa-small "$DIR/tiny"
    rm -rf "$DIR/tiny/golden"
    # The fixture has no chat template; ChatML makes /v1/chat/completions work.
    printf '%s' '{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}' > "$DIR/tiny/chat_template.jinja"
    "$NIBBLE_TOOLS" convert "$DIR/tiny" -o "$DIR/tiny.nbl" --quant q8 >"$DIR/convert.log" 2>&1
    MODEL=$DIR/tiny.nbl
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 30 s) for URL while process PID lives.
wait_health() {
    for _ in $(seq 60); do
        curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

# Starts a replica on a free port (another process on this machine may take
# the port between asking and binding: then try another). Sets PORT and PID.
start_replica() {
    for _ in 1 2 3 4 5; do
        PORT=$(free_port)
        "$NIBBLE" serve -m "$MODEL" --host 127.0.0.1 --port "$PORT" --ctx 512 -t 1 \
            >"$DIR/replica-$PORT.log" 2>&1 &
        PID=$!
        PIDS+=("$PID")
        wait_health "http://127.0.0.1:$PORT/health" "$PID" && return 0
        kill "$PID" 2>/dev/null || true
    done
    log "FAIL: no replica started (see $DIR/replica-*.log)"
    exit 1
}
start_replica; PORT_A=$PORT; PID_A=$PID
start_replica; PORT_B=$PORT; PID_B=$PID

write_nginx_conf() {
# The deploy/nginx.conf directives, with this run's ports and paths.
cat >"$DIR/nginx.conf" <<EOF
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
$( [ "$(id -u)" -eq 0 ] && echo "user root;" )
events { worker_connections 64; }
http {
    access_log $DIR/nginx-access.log;
    client_body_temp_path $DIR/client_body;
    proxy_temp_path $DIR/proxy;
    fastcgi_temp_path $DIR/fastcgi;
    uwsgi_temp_path $DIR/uwsgi;
    scgi_temp_path $DIR/scgi;
    upstream nibble {
        hash \$http_x_session_id consistent;
        server 127.0.0.1:$PORT_A max_fails=1 fail_timeout=10s;
        server 127.0.0.1:$PORT_B max_fails=1 fail_timeout=10s;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$PORT_LB;
        client_max_body_size 16m;
        location / {
            proxy_pass http://nibble;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
            proxy_send_timeout 60s;
            proxy_read_timeout 120s;
            add_header X-Upstream \$upstream_addr always;
        }
    }
}
EOF
}
nginx_up=
for _ in 1 2 3 4 5; do
    PORT_LB=$(free_port)
    write_nginx_conf
    "$NGINX" -p "$DIR" -c "$DIR/nginx.conf" -g 'daemon off;' >"$DIR/nginx.out" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    if wait_health "http://127.0.0.1:$PORT_LB/health" "$PID"; then nginx_up=1; break; fi
    kill "$PID" 2>/dev/null || true
done
[ -n "$nginx_up" ] || { log "FAIL: nginx did not start (see $DIR/nginx*)"; exit 1; }
log "replicas on :$PORT_A (pid $PID_A) and :$PORT_B (pid $PID_B), nginx on :$PORT_LB"

timeout 180 python3 - "$PORT_LB" "$PORT_A" "$PORT_B" "$PID_A" "$PID_B" <<'EOF'
import os, signal, sys, time
import openai

lb, port_a, port_b, pid_a, pid_b = sys.argv[1:]
replica_pid = {f"127.0.0.1:{port_a}": int(pid_a), f"127.0.0.1:{port_b}": int(pid_b)}
base = f"http://127.0.0.1:{lb}/v1"
failures = []
requests = 0

def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)

def client(session):
    return openai.OpenAI(base_url=base, api_key="x", timeout=30, max_retries=0,
                         default_headers={"X-Session-Id": session})

def ask(session, text):
    """One chat turn; returns (replica that answered, reply text)."""
    global requests
    requests += 1
    raw = client(session).with_raw_response.chat.completions.create(
        model="nibble", messages=[{"role": "user", "content": text}],
        max_tokens=4, temperature=0)
    up = raw.headers.get("x-upstream", "")
    reply = raw.parse().choices[0].message.content
    # After a failover nginx lists every replica tried; the last answered.
    return up.split(",")[-1].strip(), reply

sessions = [f"conv-{i}" for i in range(12)]
where = {}
sticky = True
for s in sessions:
    seen = {ask(s, f"hello {s} turn {t}")[0] for t in range(3)}
    where[s] = seen.pop() if len(seen) == 1 else None
    if where[s] is None:
        sticky = False
        print(f"  {s} went to several replicas")
check(sticky, "affinity: each of 12 sessions kept its replica over 3 turns")
check(set(where.values()) == set(replica_pid),
      f"spread: sessions on both replicas ({sum(v == list(replica_pid)[0] for v in where.values())}"
      f"/{sum(v == list(replica_pid)[1] for v in where.values())})")

# Streaming goes through nginx unbuffered: several chunks arrive.
stream = client(sessions[0]).chat.completions.create(
    model="nibble", messages=[{"role": "user", "content": "stream please"}],
    max_tokens=8, temperature=0, stream=True)
requests += 1
chunks = sum(1 for _ in stream)
check(chunks >= 2, f"streaming through nginx: {chunks} chunks")

# Failover: stop the replica of the first session; its sessions move over.
victim = where[sessions[0]]
if victim in replica_pid:
    os.kill(replica_pid[victim], signal.SIGTERM)
    for _ in range(50):
        try:
            os.kill(replica_pid[victim], 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    survivor = next(r for r in replica_pid if r != victim)
    moved = [s for s in sessions if where[s] == victim]
    ok = True
    for s in moved:
        for t in range(2):
            try:
                up, reply = ask(s, f"after failover {t}")
                if up != survivor:
                    ok = False
                    print(f"  {s} answered by {up!r}, expected {survivor}")
            except Exception as e:  # noqa: BLE001 - any failure is the test's failure
                ok = False
                print(f"  {s}: {type(e).__name__}: {e}")
    check(ok, f"failover: {len(moved)} sessions of stopped {victim} answered by {survivor}")
    stay = [s for s in sessions if where[s] == survivor]
    check(all(ask(s, "still here")[0] == survivor for s in stay),
          f"the other {len(stay)} sessions stay on {survivor}")
else:
    check(False, "failover: no replica to stop")

print(f"{requests} requests; " + ("PASS" if not failures else f"FAIL ({len(failures)} checks)"))
sys.exit(1 if failures else 0)
EOF
