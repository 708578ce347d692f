#!/usr/bin/env bash
# Fresh machine -> simulated microscope -> calibrate -> defocus -> autofocus, recorded in
# the embedded catalog. Prints where the catalog and the plot are.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/bluesky-deepfocus demo "$@"
