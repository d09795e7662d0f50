#!/bin/sh
# Headless Chromium + chromedriver for the playground's browser test (tests/serve/test_playground.py).
# Idempotent and quiet: does nothing when both are installed. Installs with apt-get only when
# running as root on a machine with apt; otherwise says what to install and exits 0 (the
# browser test then skips, naming the reason).
set -eu

have() { command -v "$1" >/dev/null 2>&1; }

if (have chromium || have chromium-browser) && (have chromedriver || [ -x /usr/lib/chromium/chromedriver ]); then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! have apt-get; then
    echo "install_browser: no chromium/chromedriver and cannot apt-get here (not root or no apt);" \
         "install 'chromium' and 'chromium-driver' to run the playground browser test" >&2
    exit 0
fi
echo "install_browser: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists; refresh them only if the install cannot find the packages.
if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
    # Never fail `make test` over the browser: without it the playground test skips, saying why.
    if ! { apt-get update -qq >/dev/null && \
           apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; then
        echo "install_browser: apt-get could not install chromium/chromium-driver;" \
             "the playground browser test will skip" >&2
    fi
fi
