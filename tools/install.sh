#!/usr/bin/env bash
# tools/install.sh: builds hubnat and installs it in one command: the binary, its man pages and
# bash/zsh/fish completions (generated from the CLI's own definitions by `hubnat generate`), the
# systemd unit and an example configuration. `--help` lists the options.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/usr/local
DESTDIR=${DESTDIR:-}
DRY=0
BUILD=1
BIN=""
USER_ADD=1

usage() {
  cat <<'EOF'
Usage: sudo tools/install.sh [options] [PREFIX]

Builds hubnat (cargo build --release) and installs, under PREFIX (default /usr/local):
  PREFIX/bin/hubnat
  PREFIX/share/man/man1/hubnat.1 and hubnat-SUBCOMMAND.1 for each subcommand
  PREFIX/share/bash-completion/completions/hubnat
  PREFIX/share/zsh/site-functions/_hubnat
  PREFIX/share/fish/vendor_completions.d/hubnat.fish
  /etc/systemd/system/hubnat.service   (its ExecStart runs PREFIX/bin/hubnat)
  /etc/hubnat/hubnat.toml              (an example; an existing file is kept and the example
                                        goes beside it as hubnat.toml.example)
and makes the system user `hubnat` that hubnat runs as once started (if missing).

  --dry-run       print what would be done, change nothing (needs no root)
  --no-build      install target/release/hubnat as it is
  --bin PATH      install this hubnat binary (no build)
  --destdir DIR   stage everything under DIR (for packages; also $DESTDIR); no user is made
  --no-user       do not make the user hubnat
  -h, --help      this text

Then: sudo systemctl enable --now hubnat; man hubnat; sudo hubnat demo.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    --destdir) DESTDIR=$2; shift 2 ;;
    --no-user) USER_ADD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
    *) PREFIX=$1; shift ;;
  esac
done
case "$PREFIX" in
  /*) ;;
  *) echo "install.sh: PREFIX must be an absolute path, not $PREFIX" >&2; exit 2 ;;
esac
PREFIX=${PREFIX%/}
[ -n "$DESTDIR" ] && USER_ADD=0
[ -n "$BIN" ] || BIN="$ROOT/target/release/hubnat"

# Each action is printed; with --dry-run, only printed.
act() {
  echo "  $*"
  [ "$DRY" = 1 ] || "$@"
}

if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ] && [ -z "$DESTDIR" ]; then
  echo "install.sh: installing under $PREFIX and /etc needs root: sudo tools/install.sh" \
       "(or --destdir DIR to stage, --dry-run to see what it does)" >&2
  exit 1
fi

if [ "$DRY" = 1 ]; then
  echo "hubnat: would install under ${DESTDIR}${PREFIX} (dry run: nothing is changed)"
else
  echo "hubnat: installing under ${DESTDIR}${PREFIX}"
fi
if [ "$BUILD" = 1 ]; then
  echo "build:"
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    # As the user who ran sudo: target/ stays theirs, and their login shell finds their cargo
    # (rustup's is seldom on root's PATH).
    act sudo -u "$SUDO_USER" -H -- sh -lc \
      'cd "$1" && cargo build --release -p hubnat-tools --bin hubnat' sh "$ROOT"
  elif command -v cargo > /dev/null || [ "$DRY" = 1 ]; then
    act cargo build --release --manifest-path "$ROOT/Cargo.toml" -p hubnat-tools --bin hubnat
  else
    echo "install.sh: cargo is not on PATH: build first (cargo build --release), then run" \
         "tools/install.sh --no-build" >&2
    exit 1
  fi
fi
if [ "$DRY" = 0 ] && [ ! -x "$BIN" ]; then
  echo "install.sh: no hubnat binary at $BIN (build it, or give --bin PATH)" >&2
  exit 1
fi

bindir="$DESTDIR$PREFIX/bin"
man1="$DESTDIR$PREFIX/share/man/man1"
bash_dir="$DESTDIR$PREFIX/share/bash-completion/completions"
zsh_dir="$DESTDIR$PREFIX/share/zsh/site-functions"
fish_dir="$DESTDIR$PREFIX/share/fish/vendor_completions.d"
unit_dir="$DESTDIR/etc/systemd/system"
conf_dir="$DESTDIR/etc/hubnat"

# Generated files go through a directory of their own, never into the repository.
GEN=$(mktemp -d "${TMPDIR:-/tmp}/hubnat-install.XXXXXX")
trap 'rm -rf "$GEN"' EXIT

# Man pages and completions come from the binary being installed. A dry run before the build
# may have none, or an older one without `generate`: it then says what would come.
generated=1
if ! [ -x "$BIN" ] || ! "$BIN" generate man "$GEN/man" > /dev/null 2>&1; then
  if [ "$DRY" = 0 ]; then
    echo "install.sh: $BIN cannot generate its man pages (\`hubnat generate\`): is it older" \
         "than this checkout? Rebuild it, or leave out --no-build/--bin" >&2
    exit 1
  fi
  generated=0
fi

echo "binary:"
act install -D -m 0755 "$BIN" "$bindir/hubnat"

echo "man pages:"
if [ "$generated" = 1 ]; then
  for page in "$GEN"/man/*.1; do
    act install -D -m 0644 "$page" "$man1/$(basename "$page")"
  done
else
  echo "  (after the build: hubnat.1 and hubnat-SUBCOMMAND.1 into $man1)"
fi

echo "completions:"
if [ "$generated" = 1 ]; then
  for shell in bash zsh fish; do
    "$BIN" generate completions "$shell" "$GEN/$shell" > /dev/null
  done
  act install -D -m 0644 "$GEN/bash/hubnat.bash" "$bash_dir/hubnat"
  act install -D -m 0644 "$GEN/zsh/_hubnat" "$zsh_dir/_hubnat"
  act install -D -m 0644 "$GEN/fish/hubnat.fish" "$fish_dir/hubnat.fish"
else
  echo "  (after the build: $bash_dir/hubnat, $zsh_dir/_hubnat, $fish_dir/hubnat.fish)"
fi

echo "systemd unit:"
sed "s|/usr/local/bin/hubnat|$PREFIX/bin/hubnat|" "$ROOT/tools/systemd/hubnat.service" \
  > "$GEN/hubnat.service"
act install -D -m 0644 "$GEN/hubnat.service" "$unit_dir/hubnat.service"

echo "configuration:"
if [ -e "$conf_dir/hubnat.toml" ]; then
  act install -D -m 0644 "$ROOT/tools/systemd/hubnat.toml" "$conf_dir/hubnat.toml.example"
  echo "  ($conf_dir/hubnat.toml exists: kept)"
else
  act install -D -m 0644 "$ROOT/tools/systemd/hubnat.toml" "$conf_dir/hubnat.toml"
fi

if [ "$USER_ADD" = 1 ]; then
  echo "user:"
  if getent passwd hubnat > /dev/null; then
    echo "  (user hubnat exists)"
  elif command -v useradd > /dev/null; then
    act useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin --comment "hubnat virtual NAT" hubnat
  else
    echo "  (no useradd: hubnat will run as nobody once started)"
  fi
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  echo "systemd:"
  act systemctl daemon-reload
fi

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was changed."
else
  echo "done. Next: sudo systemctl enable --now hubnat; hubnat status; man hubnat; sudo hubnat demo"
fi
