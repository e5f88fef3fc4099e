# Sourced by setup.sh and setup-served.sh: install_lock VENV LOCK installs LOCK's exact versions into VENV
# with uv (parallel downloads, a shared cache: 52 s for the 7 GB project lock with the cache warm, bytecode
# compiled, against ~3.5 min with pip here). uv's own version is pinned in LOCK (`uv==...`), bootstrapped by pip.

install_lock() {
    local venv=$1 lock=$2 uv_pin
    uv_pin=$(grep -E '^uv==' "$lock" || true)
    if [ -z "$uv_pin" ]; then
        echo "setup: $lock pins no uv (expected a line 'uv==VERSION')" >&2
        return 2
    fi
    # (grep drops warnings about index locations some machines' pip.conf names but lack)
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$uv_pin" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    # --compile-bytecode: pip does it at install; without it every stage recompiles (PYTHONDONTWRITEBYTECODE)
    "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" -r "$lock"
}
