# Installs the Debian packages keyledger needs, if any is missing.
# Sourced by run.sh and test.sh; uses sudo when not root.
kl_install_deps() {
  local pkgs=(build-essential cmake pkg-config libuv1-dev libmsgpack-dev
              node-llhttp libjansson-dev libssl-dev zlib1g-dev libcmocka-dev
              python3 "$@")
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "keyledger: installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}
