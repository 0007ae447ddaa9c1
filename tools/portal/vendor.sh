#!/bin/sh
# Copies the console's front-end libraries from npm into the controller package, so the console needs no CDN.
# Run after changing package.json: `npm ci && ./vendor.sh`, then commit the copied files.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/../../replicator/controller/portal/static/vendor"
mkdir -p "$dest"
cp "$here/node_modules/chart.js/dist/chart.umd.min.js" "$dest/chart.umd.min.js"
cp "$here/node_modules/chart.js/LICENSE.md" "$dest/chart.js.LICENSE.md"
echo "vendored chart.js $(node -p "require('$here/node_modules/chart.js/package.json').version") into $dest"
