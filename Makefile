# pyrio: `make run` starts the runtime, `make test` runs the whole suite.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python

# Debian packages the runtime needs on a node, and those the tests add.
RUN_PACKAGES := runc crun containernetworking-plugins iproute2 iptables busybox-static util-linux python3-venv
TEST_PACKAGES := docker-registry apache2-utils openssl dbus-daemon gcc libc6-dev

export PYRIO_CONFIG ?= /etc/pyrio/pyrio.toml
export PYRIO_PYTHON ?= $(PYTHON)
export PYRIO_SUPERVISOR_DIR ?= /run/pyrio/supervisor
CNI_CONFIG_DIR ?= /etc/cni/net.d

.PHONY: run test bench system-packages test-system-packages venv cni-default clean install uninstall test-node guest-image

# apt-get runs only when a package is missing, so repeated runs stay fast.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

system-packages:
	$(call apt_install,$(RUN_PACKAGES))

test-system-packages: system-packages
	$(call apt_install,$(TEST_PACKAGES))

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

cni-default: system-packages
	@mkdir -p $(CNI_CONFIG_DIR)
	@if ! ls $(CNI_CONFIG_DIR) 2>/dev/null | grep -qE '\.(conflist|conf|json)$$'; then \
		install -m 0644 services/netd/default.conflist $(CNI_CONFIG_DIR)/10-pyrio.conflist; \
		echo "installed the default CNI network in $(CNI_CONFIG_DIR)"; \
	fi

run: system-packages venv cni-default
	@mkdir -p $(PYRIO_SUPERVISOR_DIR)
	$(VENV)/bin/supervisord -n -c supervisord.conf

test: test-system-packages venv
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: test-system-packages venv
	$(PYTHON) -m bench

# A systemd node: the venv in $(PREFIX), config in $(SYSCONFDIR), pyrio.service (deploy/).
PREFIX ?= /opt/pyrio
SYSCONFDIR ?= /etc/pyrio
install: system-packages
	PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR) CNI_CONFIG_DIR=$(CNI_CONFIG_DIR) sh deploy/install.sh

uninstall:
	PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR) sh deploy/uninstall.sh

# The node lane (docs/NODE.md): a guest with systemd as PID 1 on cgroup v2.
guest-image: venv
	$(PYTHON) -m tests.node.guest build

test-node: test-system-packages venv
	PYRIO_NODE_LANE=1 $(PYTHON) -m pytest tests/node $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
