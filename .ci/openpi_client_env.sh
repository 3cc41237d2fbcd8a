#!/usr/bin/env bash
# The client environment of the server tests (tests/test_serve.py): the real `openpi-client` package, which
# pins numpy < 2 and so gets its own virtual environment beside lwam's. Source it from .ci/run before pytest:
#     source .ci/openpi_client_env.sh
# It creates the venv (default .venv-openpi in the repository, or $LWAM_OPENPI_VENV) and exports
# LWAM_OPENPI_PYTHON, which the tests use; under CI=true the tests fail instead of skipping without it.
# typing_extensions: openpi-client 0.1.2 imports it without declaring it.
# (It sets no shell options: .ci/run runs with set -euo pipefail.)
LWAM_OPENPI_VENV="${LWAM_OPENPI_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-openpi}"
if [ ! -x "$LWAM_OPENPI_VENV/bin/python" ]; then
    python -m venv "$LWAM_OPENPI_VENV"
fi
"$LWAM_OPENPI_VENV/bin/python" -m pip install -q --disable-pip-version-check openpi-client typing_extensions
"$LWAM_OPENPI_VENV/bin/python" -c "import openpi_client, numpy; print('openpi-client env:', numpy.__version__)"
export LWAM_OPENPI_PYTHON="$LWAM_OPENPI_VENV/bin/python"
