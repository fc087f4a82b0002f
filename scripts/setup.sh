#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system libraries, a virtual environment, the project.
# Re-running it is cheap: each step checks whether it is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
APT_PACKAGES=(libibverbs1 librdmacm1 prometheus chromium chromium-driver)

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.tq-mooncake-installed"
want=$(cat pyproject.toml scripts/setup.sh scripts/build_pth.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing tq-mooncake and its dependencies into $VENV"
  # torch first and pinned: the CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[cpu,dev]" "torch==2.13.0"
  echo "$want" > "$stamp"
fi
