#!/bin/sh
# `make install`: pyrio on a systemd node. Installs the code into a venv
# under $PREFIX, the config into $SYSCONFDIR, the unit, a default CNI
# network (only where none exists) and /etc/crictl.yaml (only when absent),
# then enables and (re)starts pyrio.service. Files it created and did not
# find are listed in $PREFIX/created, which `make uninstall` reads.
set -eu
: "${PREFIX:=/opt/pyrio}" "${SYSCONFDIR:=/etc/pyrio}" "${UNITDIR:=/etc/systemd/system}"
: "${CNI_CONFIG_DIR:=/etc/cni/net.d}" "${CRICTL_CONFIG:=/etc/crictl.yaml}"
src=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$PREFIX" "$SYSCONFDIR"
created="$PREFIX/created"
touch "$created"
record() { grep -qxF "$1" "$created" || echo "$1" >> "$created"; }

# PIP_NO_INDEX/PIP_FIND_LINKS in the environment install offline (the node
# lane does). $PYRIO_PIP: a pip to install with instead of the venv's own (the
# node lane's guest has one; ensurepip alone takes minutes under emulation).
if [ -n "${PYRIO_PIP:-}" ]; then
    [ -x "$PREFIX/venv/bin/python" ] || python3 -m venv --without-pip "$PREFIX/venv"
    $PYRIO_PIP --python "$PREFIX/venv/bin/python" install -q --upgrade "$src"
else
    [ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q --upgrade "$src"
fi
install -m 0644 "$src/README.md" "$PREFIX/README.md"

install -m 0644 "$src/supervisord.conf" "$SYSCONFDIR/supervisord.conf"
if [ ! -e "$SYSCONFDIR/pyrio.toml" ]; then
    # The effective defaults, written out for the operator to edit.
    PYRIO_CONFIG="$SYSCONFDIR/pyrio.toml" "$PREFIX/venv/bin/pyrio" config > "$SYSCONFDIR/pyrio.toml.new"
    mv "$SYSCONFDIR/pyrio.toml.new" "$SYSCONFDIR/pyrio.toml"
    record "$SYSCONFDIR/pyrio.toml"
fi
mkdir -p "$CNI_CONFIG_DIR"
if ! ls "$CNI_CONFIG_DIR" | grep -qE '\.(conflist|conf|json)$'; then
    install -m 0644 "$src/services/netd/default.conflist" "$CNI_CONFIG_DIR/10-pyrio.conflist"
    record "$CNI_CONFIG_DIR/10-pyrio.conflist"
fi
if [ ! -e "$CRICTL_CONFIG" ]; then
    install -m 0644 "$src/deploy/crictl.yaml" "$CRICTL_CONFIG"
    record "$CRICTL_CONFIG"
fi
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" "$src/deploy/pyrio.service" > "$UNITDIR/pyrio.service.new"
mv "$UNITDIR/pyrio.service.new" "$UNITDIR/pyrio.service"
systemctl daemon-reload
systemctl enable pyrio.service
# A restart leaves shims and containers running (KillMode=process).
systemctl restart pyrio.service
echo "pyrio installed: systemctl status pyrio; crictl info"
