#!/bin/sh
# Build the example benchmark into an OCI image layout (examples/hello/oci, tag "latest") without
# Docker: a static busybox plus bench.sh, packed with umoci.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
layout="$here/oci"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT

mkdir -p "$tree/bin" "$tree/etc" "$tree/tmp" "$tree/bench"
cp /bin/busybox "$tree/bin/busybox"
for applet in sh awk echo printf uname nproc cat ls id; do ln -s busybox "$tree/bin/$applet"; done
cp "$here/bench.sh" "$tree/bench/bench.sh"
printf 'root:x:0:0:root:/root:/bin/sh\nbench:x:1000:1000:bench:/bench:/bin/sh\n' > "$tree/etc/passwd"
printf 'root:x:0:\nbench:x:1000:\n' > "$tree/etc/group"
chmod 1777 "$tree/tmp"

rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci insert --rootless --image "$layout:latest" "$tree" /
umoci config --image "$layout:latest" \
    --config.entrypoint /bench/bench.sh \
    --config.env PATH=/bin \
    --config.workingdir /bench \
    --config.user bench \
    --os linux --architecture amd64
umoci gc --layout "$layout"
echo "built $layout:latest"
