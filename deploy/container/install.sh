#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
#
# Install haios the way the container image does. deploy/container/Containerfile
# runs exactly this script, and tests/unit/test_fleet_manifests.py runs the same
# phases on a Debian machine into a throw-away directory, so what the image gets
# is what the tests proved.
#
# Usage: install.sh [packages] [engine] [files]     (no argument: all three, in order)
#
#   packages  the Debian packages the engine needs at run time, with apt-get
#   engine    a virtual environment at $HAIOS_PREFIX holding haios, installed with
#             pip from the source tree; haios and haios-client linked into
#             /usr/local/bin
#   files     the shipped policy as an example (no key), the entrypoint, and the
#             root-owned directories the fleet manifests mount files into
#
# Environment (all optional):
#   HAIOS_SRC        the source tree (default: two levels above this script)
#   HAIOS_DESTDIR    prefix of every installed path (default: empty, this system)
#   HAIOS_PREFIX     where the virtual environment goes (default /opt/haios)
#   HAIOS_PYTHON     the interpreter that creates it (default /usr/bin/python3,
#                    Debian's, which the image has)
#   HAIOS_APT        "install" (default) or "check": only verify with dpkg-query
#                    that every package is installed (for a machine you do not
#                    want changed)
#   HAIOS_PIP_CACHE  "off" (default, nothing cached in the image) or "on"
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src=${HAIOS_SRC:-$(cd "$here/../.." && pwd)}
dest=${HAIOS_DESTDIR:-}
prefix=${HAIOS_PREFIX:-/opt/haios}
python=${HAIOS_PYTHON:-/usr/bin/python3}

# What the engine needs at run time and why:
#   libseccomp2      pyseccomp loads libseccomp.so.2 to compile the step filters
#   python3          the engine, its watchdog (python -I -S) and the sandbox launcher
#   python3-venv     ensurepip, so the virtual environment brings its own pip
#   ca-certificates  TLS verification towards Vault and the Pushgateway
# Steps of the shipped profiles use /bin/sh, coreutils and /usr/bin/python3,
# which the Debian base and python3 provide.
PACKAGES="libseccomp2 python3 python3-venv ca-certificates"

phase_packages() {
    if [ "${HAIOS_APT:-install}" = check ]; then
        for package in $PACKAGES; do
            status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
            if [ "$status" != "install ok installed" ]; then
                echo "install.sh: Debian package $package is not installed" >&2
                exit 1
            fi
        done
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $PACKAGES
    rm -rf /var/lib/apt/lists/*
}

phase_engine() {
    venv="$dest$prefix"
    "$python" -m venv "$venv"
    cache="--no-cache-dir"
    if [ "${HAIOS_PIP_CACHE:-off}" = on ]; then
        cache=""
    fi
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install $cache --disable-pip-version-check --no-input "$src"
    install -d -m 0755 "$dest/usr/local/bin"
    for program in haios haios-client; do
        ln -sfn "$venv/bin/$program" "$dest/usr/local/bin/$program"
    done
}

phase_files() {
    example="$dest/usr/share/haios/policy-example"
    install -d -m 0755 "$example" "$example/profiles"
    install -m 0644 "$src/policy/policy.toml" "$src/policy/README.md" "$example/"
    install -m 0644 "$src"/policy/profiles/*.toml "$example/profiles/"
    # Mount points. Kubernetes (subPath) and Nomad (bind mounts) put each policy
    # file here as a regular file; the policy loader requires the folder and its
    # subdirectories to be real directories owned by root and not writable by
    # group or others, so they are created in the image with that mode.
    install -d -m 0755 "$dest/etc/haios" "$dest/etc/haios/policy" \
        "$dest/etc/haios/policy/keys" "$dest/etc/haios/policy/profiles" \
        "$dest/etc/haios/engine-key"
    # The default state_dir; the fleet manifests mount a host directory over it.
    install -d -m 0700 "$dest/var/lib/haios"
    install -d -m 0755 "$dest/usr/local/bin"
    install -m 0755 "$here/haios-entrypoint" "$dest/usr/local/bin/haios-entrypoint"
}

if [ "$#" -eq 0 ]; then
    set -- packages engine files
fi
for phase in "$@"; do
    case "$phase" in
        packages) phase_packages ;;
        engine) phase_engine ;;
        files) phase_files ;;
        *)
            echo "install.sh: unknown phase '$phase' (packages, engine, files)" >&2
            exit 2
            ;;
    esac
done
