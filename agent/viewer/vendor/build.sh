#!/usr/bin/env bash
# Rebuild three-viewer.min.js: the parts of three.js (MIT) that agent/viewer/viewer.js uses, bundled by esbuild into
# one classic script (global THREE) so each viewer.html can inline it and open from file:// with no network.
# Needs node + npm (the npm registry); the output is committed, so users never run this.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
THREE_VERSION=0.187.0
ESBUILD_VERSION=0.28.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/three-entry.js" "$work/entry.js"
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund "three@$THREE_VERSION" "esbuild@$ESBUILD_VERSION" >/dev/null
banner="/*! three.js ${THREE_VERSION} (MIT, https://threejs.org, licence text in LICENSE-three beside this file): \
WebGLRenderer, points, lines, raycasting and OrbitControls, bundled with esbuild $ESBUILD_VERSION for scanagent's viewer. */"
npx esbuild entry.js --bundle --minify --format=iife --global-name=THREE --legal-comments=inline \
  "--banner:js=$banner" --outfile="$here/three-viewer.min.js"
cp node_modules/three/LICENSE "$here/LICENSE-three"
