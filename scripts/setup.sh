#!/usr/bin/env bash
# Installs what Kennel needs to build, test and run, and only what is missing,
# so a second run takes seconds. Debian 12; everything from Debian's packages,
# plus the pinned npm test tools in tests/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  # build
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libssl-dev
  libabsl-dev libtorch-dev libopencv-dev libcurl4-openssl-dev
  prometheus-cpp-dev libpugixml-dev libgoogle-glog-dev libgtest-dev
  libgmock-dev libbenchmark-dev
  # LibTorch falls back to the reference BLAS without it (9x slower GEMM).
  libopenblas0-openmp
  # fuzzing (libFuzzer ships with clang's runtime)
  clang libclang-rt-14-dev
  # tests, tools and the demo
  python3 python3-torch python3-torchvision python3-grpcio python3-grpc-tools
  python3-protobuf python3-numpy python3-pil python3-boto3
  dataset-fashion-mnist prometheus curl procps
  ceph-mon ceph-osd radosgw ceph-common
)
# Node.js may come from elsewhere on the machine; Debian's only when absent.
if ! command -v npm >/dev/null; then packages+=(nodejs npm); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

# npm test tools, pinned by the lock file; reinstalled only when it changes.
if [ -f tests/package-lock.json ]; then
  stamp=tests/node_modules/.kennel-lock.sha256
  want=$(sha256sum tests/package-lock.json | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing npm test tools from tests/package-lock.json"
    (cd tests && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
  else
    echo "setup: npm test tools present"
  fi
fi

if ! command -v kubectl >/dev/null; then
  echo "setup: kubectl is not installed and is not in Debian 12; the manifest checks will be skipped" >&2
fi
