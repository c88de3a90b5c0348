#!/usr/bin/env bash
# TorchServe's frontend is Java: it needs a Java 17+ runtime on PATH.
set -u
if ! command -v java >/dev/null 2>&1; then
  echo "Java 17+ is required by TorchServe but 'java' is not on PATH." >&2
  echo "Install it, e.g. on Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2
  exit 1
fi
major=$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1") ? v[2] : v[1]; exit}')
if [ -z "$major" ] || [ "$major" -lt 17 ]; then
  echo "Java 17+ is required by TorchServe; found: $(java -version 2>&1 | head -1)" >&2
  echo "Install a newer one, e.g.: sudo apt-get install -y openjdk-17-jre-headless" >&2
  exit 1
fi
