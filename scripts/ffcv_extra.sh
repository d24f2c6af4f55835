#!/usr/bin/env bash
# make setup's FFCV step: FFCV (the optional extra `ffcv`) compiles its extension against the pkg-config packages
# opencv4 and libturbojpeg (its setup.py asks `pkg-config --cflags --libs` for each and stops without them).
# Where pkg-config finds both, run the given install command; otherwise print one line naming what is missing and
# the two ways to get it, and exit 0 so that the rest of the set-up (the WebDataset path) goes on.
#   scripts/ffcv_extra.sh pip install --no-build-isolation ffcv==1.0.2
set -euo pipefail
missing=""
if ! command -v pkg-config >/dev/null 2>&1; then
  missing="pkg-config (and so opencv4, libturbojpeg)"
else
  for lib in opencv4 libturbojpeg; do
    pkg-config --exists "$lib" || missing="${missing:+$missing, }$lib"
  done
fi
if [ -n "$missing" ]; then
  echo "ffcv skipped (data.format=ffcv unavailable, WebDataset works): pkg-config lacks $missing; get them as root" \
       "with 'apt-get install libopencv-dev libturbojpeg0-dev pkg-config', or without root from conda-forge" \
       "('conda install -c conda-forge opencv libjpeg-turbo pkg-config' in an active environment), then make setup"
  exit 0
fi
exec "$@"
