#!/bin/sh
# The serving image's command (deploy/Dockerfile): TorchServe in the foreground, the archive and
# configuration baked into the image (KOA_CONFIG may point to a mounted one). Everything it writes
# goes under /tmp, so the root filesystem can be read-only.
set -eu
mkdir -p "$KOA_STATE_DIR" "$LOG_LOCATION"
exec torchserve --foreground --ncs \
    --model-store /opt/koa/model-store --models oamen=oamen.mar \
    --ts-config "$KOA_CONFIG" --log-config /opt/koa/config/log4j2.xml
