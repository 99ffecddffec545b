#!/usr/bin/env bash
# Builds anneal's container images from this repository, offline (no registry is needed: every image is
# FROM scratch), and saves each as an OCI archive that a node's containerd imports.
#
#   images/build.sh                    pause, anneal-operator, anneal-runtime (the CPU runtime)
#   images/build.sh cuda               anneal-runtime-cuda (see below)
#   images/build.sh IMAGE...           only those (pause, anneal-operator, anneal-runtime, anneal-runtime-cuda,
#                                      anneal-runtime-gpufault: a test image whose "GPU" fails on demand)
#
# Settings (environment):
#   ANNEAL_IMAGE_REGISTRY   repository prefix            default ghcr.io/anneal-dev (the chart's default names)
#   ANNEAL_IMAGE_TAG        tag                          default the workspace version (the chart's appVersion)
#   ANNEAL_IMAGE_PROFILE    cargo profile, dev|release   default dev (the profile the tests build: the runtime
#                                                        and every dependency optimised, Cargo.toml)
#   ANNEAL_IMAGE_PUSH=1     push each image after building it (`podman login` to the registry first)
#   ANNEAL_IMAGES_DIR       where archives go            default ~/.cache/anneal/images
#
# Out: $ANNEAL_IMAGES_DIR/<image>.oci.tar (an OCI archive) and <image>.ref (its full reference), one line per
# image on stdout: "REFERENCE ARCHIVE". An image whose content is unchanged since the last build (same
# binary, libraries, recipe and reference) is not built again.
#
# What goes into an image: the binary (debug info stripped), the shared libraries `ldd` names for it, CA
# certificates, /etc/passwd and /etc/group with the non-root user 65532 (nonroot) the pods run as, and an empty
# /tmp (the pods mount an emptyDir there; their root filesystem is read-only).
#
# The cuda image: the binary of runtime/scripts/cuda/build.sh (the `cuda` feature, compiled here with nvcc
# from PyPI and link stubs), and the CUDA libraries it links (cuBLAS, cuBLASLt, cuRAND, the CUDA runtime, NCCL)
# from NVIDIA's PyPI wheels, installed into ~/.cache/anneal/cuda-runtime. libcuda.so.1 belongs to the driver
# and is mounted by the NVIDIA container toolkit on a GPU node; it is not in the image. Nothing here can run
# it: this machine has no GPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

ANNEAL_CACHE="${ANNEAL_CACHE:-$HOME/.cache/anneal}"
IMAGES_DIR="${ANNEAL_IMAGES_DIR:-$ANNEAL_CACHE/images}"
REGISTRY="${ANNEAL_IMAGE_REGISTRY:-ghcr.io/anneal-dev}"
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
TAG="${ANNEAL_IMAGE_TAG:-$VERSION}"
PROFILE="${ANNEAL_IMAGE_PROFILE:-dev}"
# The pause image carries upstream's pause version (build/pause/Makefile of the pinned module), not ours.
PAUSE_TAG="3.10.1"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ANNEAL_CACHE/target}"
# shellcheck source=../e2e/cluster/versions.env
source "$REPO/e2e/cluster/versions.env"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$PROFILE" in
  dev) PROFILE_DIR=debug ;;
  release) PROFILE_DIR=release ;;
  *) die "ANNEAL_IMAGE_PROFILE=$PROFILE: expected dev or release" ;;
esac

# podman (or buildah) from Debian; both build without a daemon. Installed when missing and we may.
builder() {
  if command -v podman >/dev/null; then
    echo podman
  elif command -v buildah >/dev/null; then
    echo buildah
  elif [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing podman (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >&2 ||
      { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >&2; }
    echo podman
  else
    die "neither podman nor buildah is installed (Debian: apt-get install podman)"
  fi
}

# A storage of our own: the images never mix with whatever else podman holds on the machine, and vfs works on
# any filesystem (these images have one layer; nothing is gained from overlay).
STORAGE=(--root "$IMAGES_DIR/storage" --runroot "$IMAGES_DIR/run" --storage-driver vfs)

# stage_base ROOT: the files every image has besides its binary.
stage_base() {
  local root="$1"
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/usr/local/bin"
  chmod 1777 "$root/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
}

# stage_libraries ROOT BINARY [LIBDIR [NOT_SHIPPED]]: copies every shared library `ldd` resolves for BINARY into
# ROOT at the path the loader looks for it. Libraries found under LIBDIR (on LD_LIBRARY_PATH for ldd) go to
# /usr/local/cuda/lib instead; NOT_SHIPPED is a library that may be missing here (the driver's libcuda.so.1).
stage_libraries() {
  local root="$1" binary="$2" libdir="${3:-}" not_shipped="${4:-}" line name path dest
  while read -r line; do
    [[ -n "$line" ]] || continue
    case "$line" in
      *"=> not found"*)
        name="${line%% *}"
        [[ "$name" == "$not_shipped" ]] || die "$binary needs $name, which ldd does not find"
        continue
        ;;
      *"=> "*) path="$(awk '{print $3}' <<<"$line")" ;;
      /*) path="$(awk '{print $1}' <<<"$line")" ;;
      *) continue ;; # linux-vdso.so.1: the kernel's
    esac
    if [[ -n "$libdir" && "$path" == "$libdir"/* ]]; then
      dest="/usr/local/cuda/lib/$(basename "$path")"
    else
      dest="$path"
    fi
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$path" "$root$dest"
  done < <(LD_LIBRARY_PATH="$libdir" ldd "$binary")
  [[ -e "$root/lib64/ld-linux-x86-64.so.2" ]] || die "no dynamic loader staged for $binary (is it static?)"
}

# stage_binary ROOT BINARY: the binary without its debug info (the dev profile keeps it: ~400 MB otherwise).
stage_binary() {
  local root="$1" binary="$2"
  strip --strip-debug -o "$root/usr/local/bin/$(basename "$binary")" "$binary"
}

cargo_binaries() {
  [[ -z "${CARGO_BUILT:-}" ]] || return 0
  log "cargo build ($PROFILE profile) of anneal-operator and anneal-runtime into $CARGO_TARGET_DIR"
  local args=(-p anneal-operator -p anneal-runtime)
  [[ "$PROFILE" == dev ]] || args+=(--profile "$PROFILE")
  # The same invocation as e2e/demo.sh, so that the build is shared (one feature set of the dependencies).
  cargo build -q "${args[@]}" >&2
  CARGO_BUILT=1
}

# The pause binary from the pinned Kubernetes module's own source, statically linked as upstream builds it.
pause_source() {
  local mod
  # Outside any module (nothing's go.sum is touched); from the module cache when the tools were built.
  mod="$(cd / && PATH="/usr/local/go/bin:$PATH" GOTOOLCHAIN=local GOFLAGS='' \
    go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [[ -f "$mod/build/pause/linux/pause.c" ]] || die "no build/pause/linux/pause.c in $mod"
  echo "$mod/build/pause/linux/pause.c"
}

# The CUDA libraries the cuda binary links, from NVIDIA's PyPI wheels (CUDA 13.0, as the build's toolkit).
cuda_libraries() {
  local venv="${ANNEAL_CUDA_RUNTIME_CACHE:-$ANNEAL_CACHE/cuda-runtime}" marker lib
  marker="$venv/.installed-13.0-nccl"
  if [[ ! -f "$marker" ]]; then
    log "installing the CUDA 13.0 runtime libraries (cuBLAS, cuRAND, cudart, NCCL wheels) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-runtime==13.0.*" \
      "nvidia-nccl-cu13==2.28.*" >&2
    touch "$marker"
  fi
  lib="$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1)"
  [[ -n "$lib" ]] || die "no nvidia/cu13/lib under $venv; remove $marker and retry"
  # NCCL's wheel has a directory of its own: one library directory for the loader (and ldd).
  ln -sf "$(ls "$lib"/../../nccl/lib/libnccl.so.2 2>/dev/null || die "no libnccl.so.2 in the NCCL wheel")" "$lib/libnccl.so.2"
  echo "$lib"
}

# static_busybox ROOT: /bin/busybox, statically linked (Debian's busybox-static, installed when missing and we may).
static_busybox() {
  local busybox=/bin/busybox
  if [[ ! -x "$busybox" ]] || ldd "$busybox" >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || die "no static busybox; apt-get install busybox-static"
    log "installing busybox-static (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2 ||
      { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2; }
  fi
  mkdir -p "$1/bin"
  cp -L "$busybox" "$1/bin/busybox"
}

# stage IMAGE CONTEXT: fills CONTEXT/rootfs for IMAGE.
stage() {
  local image="$1" ctx="$2" root="$2/rootfs" binary lib source
  mkdir -p "$root"
  case "$image" in
    pause)
      mkdir -p "$root"
      source="$(pause_source)"
      grep -qx "TAG ?= $PAUSE_TAG" "$(dirname "$source")/../Makefile" ||
        die "the pinned module's build/pause/Makefile is not at pause $PAUSE_TAG: update PAUSE_TAG"
      cc -Os -Wall -static -DVERSION="v$PAUSE_TAG-$KUBERNETES_VERSION" -o "$root/pause" "$source"
      strip "$root/pause"
      ;;
    anneal-operator | anneal-runtime)
      cargo_binaries
      binary="$CARGO_TARGET_DIR/$PROFILE_DIR/$image"
      stage_base "$root"
      stage_binary "$root" "$binary"
      stage_libraries "$root" "$binary"
      ;;
    anneal-runtime-cuda)
      binary="$(runtime/scripts/cuda/build.sh)"
      lib="$(cuda_libraries)"
      stage_base "$root"
      stage_binary "$root" "$binary"
      stage_libraries "$root" "$binary" "$lib" libcuda.so.1
      # Loaded by libcublas.so.13 (not named by the binary itself, but by ldd's transitive list above).
      [[ -e "$root/usr/local/cuda/lib/libcublasLt.so.13" ]] || die "libcublasLt.so.13 not staged"
      ;;
    anneal-runtime-gpufault)
      # Tests only (the node tier's device-fault test): the CPU runtime, a static busybox (Debian's
      # busybox-static) and the entrypoint that fails the "GPU" on demand.
      cargo_binaries
      binary="$CARGO_TARGET_DIR/$PROFILE_DIR/anneal-runtime"
      stage_base "$root"
      stage_binary "$root" "$binary"
      stage_libraries "$root" "$binary"
      static_busybox "$root"
      cp "images/$image/gpu-fault.sh" "$root/usr/local/bin/gpu-fault.sh"
      ;;
    *) die "unknown image $image (pause, anneal-operator, anneal-runtime, anneal-runtime-cuda, anneal-runtime-gpufault)" ;;
  esac
  cp "images/$image/Containerfile" "$ctx/Containerfile"
}

# content_digest CONTEXT REFERENCE: what the image is made of; equal digests give equal images.
content_digest() {
  {
    echo "$2"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$1" . | sha256sum
  } | sha256sum | cut -d' ' -f1
}

build_image() {
  local image="$1" tool ref ctx archive digest begin=$SECONDS size unchanged
  ref="$REGISTRY/$image:$TAG"
  [[ "$image" != pause ]] || ref="$REGISTRY/pause:$PAUSE_TAG"
  archive="$IMAGES_DIR/$image.oci.tar"
  ctx="$WORK/$image"
  stage "$image" "$ctx"
  digest="$(content_digest "$ctx" "$ref")"
  tool="$(builder)"
  unchanged=0
  # A push builds again (the storage keeps no image between runs).
  if [[ -f "$archive" && "$(cat "$IMAGES_DIR/$image.digest" 2>/dev/null)" == "$digest" &&
    "${ANNEAL_IMAGE_PUSH:-0}" != 1 ]]; then
    unchanged=1
  fi
  if ((unchanged)); then
    log "$ref unchanged ($archive)"
  else
    log "building $ref with $tool"
    # FROM scratch and COPY only: no container runs during the build (so podman's RLIMIT_NOFILE trouble on this
    # machine, node-tier.md, does not arise), nothing is pulled, and --timestamp 0 makes equal content give an
    # equal image digest.
    case "$tool" in
      podman) podman "${STORAGE[@]}" build -q --pull=never --network=none --timestamp 0 \
        --label "org.opencontainers.image.version=$TAG" \
        --label "org.opencontainers.image.source=https://github.com/anneal-dev/anneal" \
        -t "$ref" -f "$ctx/Containerfile" "$ctx" >&2 ;;
      buildah) buildah "${STORAGE[@]}" build -q --pull-never --network=none --timestamp 0 \
        --label "org.opencontainers.image.version=$TAG" \
        --label "org.opencontainers.image.source=https://github.com/anneal-dev/anneal" \
        -t "$ref" -f "$ctx/Containerfile" "$ctx" >&2 ;;
    esac
    rm -f "$archive.partial"
    case "$tool" in
      podman) podman "${STORAGE[@]}" save --format oci-archive -o "$archive.partial" "$ref" >&2 ;;
      buildah) buildah "${STORAGE[@]}" push "$ref" "oci-archive:$archive.partial:$ref" >&2 ;;
    esac
    mv "$archive.partial" "$archive"
    echo "$digest" >"$IMAGES_DIR/$image.digest"
    if [[ "${ANNEAL_IMAGE_PUSH:-0}" == 1 ]]; then
      log "pushing $ref"
      "$tool" "${STORAGE[@]}" push "$ref" >&2
    fi
    # The archive is what is kept: vfs storage holds a second full copy of every image (500 MB for cuda).
    "$tool" "${STORAGE[@]}" rmi -f "$ref" >/dev/null
    "$tool" "${STORAGE[@]}" image prune -f >/dev/null
  fi
  echo "$ref" >"$IMAGES_DIR/$image.ref"
  size="$(du -m "$archive" | cut -f1)"
  log "$ref: ${size} MB archive, $((SECONDS - begin)) s"
  echo "$ref $archive"
}

main() {
  local images=("$@") image
  ((${#images[@]})) || images=(pause anneal-operator anneal-runtime)
  [[ "${images[*]}" != cuda ]] || images=(anneal-runtime-cuda)
  mkdir -p "$IMAGES_DIR"
  WORK="$(mktemp -d "$IMAGES_DIR/.build.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  for image in "${images[@]}"; do build_image "$image"; done
}

main "$@"
