# What the setup scripts of the real-host suite share (sourced, not run).
# pip_install PY LOG ARGS...: quiet unless it fails; then its output goes to stderr
# (this machine's pip config prints a warning for every package)
pip_install_with() {
    local py="$1" log="$2"; shift 2
    "$py" -m pip install -q "$@" >"$log" 2>&1 || { cat "$log" >&2; return 1; }
}
