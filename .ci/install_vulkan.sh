#!/usr/bin/env bash
# Install a CPU Vulkan driver (Mesa lavapipe >= 24.3) for ManiSkill3/SAPIEN on Debian 12.
#
# Debian 12's own Mesa (22.3) is too old for SAPIEN; the bookworm-backports
# mesa-vulkan-drivers (24.3+) works. This script:
#   1. exits early if a lavapipe ICD from a new enough Mesa is already installed;
#   2. enables <codename>-backports, reusing the URI (and Signed-By) of the
#      machine's existing apt entry for <codename> -- no mirror host is hard-coded;
#   3. apt-get update + install mesa-vulkan-drivers, libvulkan1 (and vulkan-tools)
#      from backports.
# Idempotent, non-interactive; installing must run as root (the early exit need not).
#
# Env knobs: FORCE=1 (skip the early exit), INSTALL_VULKAN_TOOLS=0 (skip vulkaninfo),
#            MIN_MESA=24.3 (minimum mesa-vulkan-drivers version).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
MIN_MESA="${MIN_MESA:-24.3}"
FORCE="${FORCE:-0}"
INSTALL_VULKAN_TOOLS="${INSTALL_VULKAN_TOOLS:-1}"

log() { echo "[install_vulkan] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

lavapipe_ok() {
    # A lavapipe ICD json must exist and mesa-vulkan-drivers must be >= MIN_MESA.
    local icd ver
    icd=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n1 || true)
    [ -n "$icd" ] || return 1
    ver=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
    [ -n "$ver" ] || return 1
    dpkg --compare-versions "$ver" ge "$MIN_MESA" || return 1
    [ -e /usr/lib/x86_64-linux-gnu/libvulkan.so.1 ] || ldconfig -p | grep -q 'libvulkan\.so\.1' || return 1
    log "lavapipe already installed: mesa-vulkan-drivers $ver ($icd)"
    return 0
}

if [ "$FORCE" != 1 ] && lavapipe_ok; then
    log "nothing to do"
    exit 0
fi

# Installing needs root (checked only now: a machine that has the driver needs nothing).
[ "$(id -u)" -eq 0 ] || die "must run as root to install (sudo bash $0)"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"

CODENAME="${CODENAME:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}"
[ -n "$CODENAME" ] || die "cannot determine the distribution codename from /etc/os-release"
BACKPORTS="${CODENAME}-backports"

# ---- 1. enable backports from the existing apt source entry -----------------
active_sources() {
    # Files apt actually reads.
    [ -f /etc/apt/sources.list ] && echo /etc/apt/sources.list
    ls /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true
}

backports_enabled() {
    local f
    for f in $(active_sources); do
        case "$f" in
            *.sources)
                # deb822: a non-comment "Suites:" line listing the backports suite
                grep -Eiq "^[[:space:]]*Suites:.*(^|[[:space:]])${BACKPORTS}([[:space:]]|\$)" "$f" && return 0 ;;
            *)
                grep -Eq "^[[:space:]]*deb[[:space:]].*[[:space:]]${BACKPORTS}[[:space:]]" "$f" && return 0 ;;
        esac
    done
    return 1
}

find_base_entry() {
    # Print "URI<TAB>SIGNED_BY" of the first active 'deb' entry for suite $CODENAME.
    local f out
    for f in $(active_sources); do
        case "$f" in
            *.sources)
                out=$(awk -v suite="$CODENAME" '
                    function flush() {
                        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "" && enabled != "no") {
                            split(uris, u, " "); printf "%s\t%s\n", u[1], signed; found = 1; exit
                        }
                        types = suites = uris = signed = ""; enabled = "yes"
                    }
                    BEGIN { enabled = "yes" }
                    /^[[:space:]]*#/ { next }
                    /^[[:space:]]*$/ { flush(); next }
                    {
                        line = $0; key = line; sub(/:.*/, "", key); val = line; sub(/^[^:]*:[[:space:]]*/, "", val)
                        gsub(/[[:space:]]+/, " ", val); sub(/ $/, "", val)
                        k = tolower(key)
                        if (k == "types") types = val
                        else if (k == "suites") suites = val
                        else if (k == "uris") uris = val
                        else if (k == "signed-by") signed = val
                        else if (k == "enabled") enabled = tolower(val)
                    }
                    END { if (!found) flush() }
                ' "$f" | head -n1) ;;
            *)
                # one-line format: deb [opts] URI suite comp...
                out=$(awk -v suite="$CODENAME" '
                    /^[[:space:]]*deb[[:space:]]/ {
                        sub(/^[[:space:]]*deb[[:space:]]+/, "")
                        signed = ""
                        if ($0 ~ /^\[/) {
                            opts = $0; sub(/\].*/, "", opts); sub(/^\[/, "", opts)
                            if (match(opts, /signed-by=[^ ]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
                            sub(/^\[[^]]*\][[:space:]]*/, "")
                        }
                        if ($2 == suite) { printf "%s\t%s\n", $1, signed; exit }
                    }' "$f" | head -n1) ;;
        esac
        if [ -n "$out" ]; then echo "$out"; return 0; fi
    done
    return 1
}

BP_FILE="/etc/apt/sources.list.d/${BACKPORTS}.sources"
if backports_enabled; then
    log "${BACKPORTS} already enabled in apt sources"
else
    entry="$(find_base_entry | head -n1)"
    [ -n "$entry" ] || die "no active apt 'deb' entry for suite '${CODENAME}' found to derive ${BACKPORTS} from"
    uri="${entry%%$'\t'*}"
    signed="${entry#*$'\t'}"
    [ -n "$uri" ] || die "could not parse the URI of the ${CODENAME} apt entry"
    log "enabling ${BACKPORTS} from existing entry URI ${uri}"
    {
        echo "Types: deb"
        echo "URIs: ${uri}"
        echo "Suites: ${BACKPORTS}"
        echo "Components: main"
        [ -n "$signed" ] && echo "Signed-By: ${signed}"
    } > "${BP_FILE}.tmp"
    mv "${BP_FILE}.tmp" "$BP_FILE"
fi

# ---- 2. install from backports -------------------------------------------
apt-get update -o Acquire::Retries=3 -qq
pkgs=(mesa-vulkan-drivers libvulkan1)
[ "$INSTALL_VULKAN_TOOLS" = 1 ] && pkgs+=(vulkan-tools)
log "installing ${pkgs[*]} from ${BACKPORTS}"
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    -t "$BACKPORTS" "${pkgs[@]}"

# ---- 3. verify ---------------------------------------------------------------
lavapipe_ok || die "mesa-vulkan-drivers >= ${MIN_MESA} with a lavapipe ICD is still not installed"
if command -v vulkaninfo >/dev/null; then
    if vulkaninfo --summary 2>/dev/null | grep -qi 'llvmpipe'; then
        log "vulkaninfo sees the llvmpipe (lavapipe) device"
    else
        log "WARNING: vulkaninfo does not list an llvmpipe device"
    fi
fi
log "done"
