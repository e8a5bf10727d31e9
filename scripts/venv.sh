# Sourced by ./run and ./test: make .venv and install the project into it, only when needed.
#
# `ensure_venv [EXTRAS]` creates .venv with $PYTHON (default python3.11) if it is missing, then
# runs `pip install -e .[EXTRAS]`, which also rebuilds the Cython hot path in place. The install
# is skipped while a stamp in .venv matches a hash of the build inputs and the extras installed.

VENV="$PWD/.venv"

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3.11}" -m venv "$VENV"
    fi
    local key stamp="$VENV/.capfaas-installed" had_key="" had_extras=""
    key=$(cat pyproject.toml setup.py MANIFEST.in $(find capfaas -name '*.pyx' -o -name '*.pxd' | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)
    # The stamp holds "KEY EXTRAS" of the last install, which also serves a request without extras.
    [ -f "$stamp" ] && read -r had_key had_extras <"$stamp"
    if [ "$had_key" = "$key" ] && { [ -z "$extras" ] || [ "$had_extras" = "$extras" ]; }; then
        return 0
    fi
    echo "Installing capfaas${extras:+[$extras]} into .venv ..." >&2
    rm -f "$stamp"
    "$VENV/bin/python" -m pip install --quiet --quiet --disable-pip-version-check --editable ".${extras:+[$extras]}"
    echo "$key $extras" >"$stamp"
}
