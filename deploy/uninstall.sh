#!/bin/sh
# `make uninstall`: stops and removes pyrio.service and what `make install`
# created. Running containers are left to the operator (remove the pods
# first: `crictl rmp -af`). The pyrio.toml, CNI network and crictl.yaml that
# install created go only while unchanged: an operator's edit is kept.
set -eu
: "${PREFIX:=/opt/pyrio}" "${SYSCONFDIR:=/etc/pyrio}" "${UNITDIR:=/etc/systemd/system}"
src=$(cd "$(dirname "$0")/.." && pwd)
if [ -e "$UNITDIR/pyrio.service" ]; then
    systemctl disable --now pyrio.service || true
    rm -f "$UNITDIR/pyrio.service"
    systemctl daemon-reload
fi
rm -f "$SYSCONFDIR/supervisord.conf"
if [ -f "$PREFIX/created" ]; then
    while read -r path; do
        case "$path" in
            */pyrio.toml) pristine=$(PYRIO_CONFIG=/nonexistent "$PREFIX/venv/bin/pyrio" config 2>/dev/null || true) ;;
            */10-pyrio.conflist) pristine=$(cat "$src/services/netd/default.conflist") ;;
            *crictl.yaml) pristine=$(cat "$src/deploy/crictl.yaml") ;;
            *) continue ;;
        esac
        if [ "$(cat "$path" 2>/dev/null)" = "$pristine" ]; then rm -f "$path"; else echo "kept $path (edited)"; fi
    done < "$PREFIX/created"
fi
rm -rf "$PREFIX"
rmdir "$SYSCONFDIR" 2>/dev/null || true
echo "pyrio uninstalled"
