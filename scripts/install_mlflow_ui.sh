#!/bin/sh
# The MLflow UI server in its own venv (default .venv-mlflow-ui), for `lmforge ui --mlflow` and
# the UI's browser test (tests/tracking/test_mlflow_ui.py, via LMFORGE_MLFLOW). Its own venv
# because the full `mlflow` package pins pyarrow below lmforge's; lmforge itself logs with
# `mlflow-skinny`, at the same version as this server (read from constraints.txt).
# Idempotent: does nothing when that version is installed. Never fails `make test`: without
# the server the browser test skips, naming the reason.
set -eu
VENV=${1:-.venv-mlflow-ui}
PYTHON=${PYTHON:-python3}
VERSION=$(sed -n 's/^mlflow-skinny==//p' constraints.txt)
if [ -z "$VERSION" ]; then
    echo "install_mlflow_ui: no mlflow-skinny pin in constraints.txt" >&2
    exit 0
fi
if [ -f "$VENV/.mlflow-$VERSION" ]; then
    exit 0
fi
echo "install_mlflow_ui: installing mlflow==$VERSION (the UI server) into $VENV" >&2
if ! { "$PYTHON" -m venv "$VENV" && \
       "$VENV/bin/python" -m pip install -q --disable-pip-version-check "mlflow==$VERSION"; }; then
    echo "install_mlflow_ui: could not install mlflow==$VERSION; the MLflow UI test will skip" >&2
    exit 0
fi
touch "$VENV/.mlflow-$VERSION"
