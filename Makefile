# The two commands the README promises: `make run` and `make test`.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint setup bench stress clean deb system-test power-test flood-test

run: $(STAMP)
	$(BIN)/elemta serve

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q
	@# Crash safety, memory flood and hostile input again with [server] workers = 2 (about 55 s).
	ELEMTA_TEST_WORKERS=2 $(BIN)/pytest -q tests/resilience tests/adversarial/test_hostile_input.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap
	VENV=$(VENV) ./scripts/bootstrap

# The resilience suites at full size (20 kills, thousands of messages); not part of CI.
stress: $(STAMP)
	ELEMTA_STRESS=1 $(BIN)/pytest -q -s tests/resilience

# elemta beside aiosmtpd, Postfix and smtp-sink, then the governor figures (bench/governor.py);
# one table. make bench BENCH_ARGS=--quick for a rough one.
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Debian package: dist/elemta_<version>+debNN_all.deb (+ dist/lintian-<release>.txt). Without DEBIAN it is
# built on this machine for its release; DEBIAN=bookworm|trixie builds in a clean chroot of that
# release (cached in /var/cache/elemta-build). See packaging/build-deb.sh.
DEBIAN ?=
VERSION = $(shell python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
RELEASE = $(if $(DEBIAN),$(DEBIAN),$(shell . /etc/os-release && echo $$VERSION_CODENAME))
SUFFIX = $(if $(filter trixie,$(RELEASE)),+deb13,+deb12)

deb:
	DEBIAN=$(DEBIAN) ./packaging/build-deb.sh

# Boots a Debian VM of $(DEBIAN) (default: this machine's release) with its own systemd (qemu,
# cgroup v2), installs that release's .deb and checks the service end to end. The VM base images
# are cached in /var/cache/elemta-vm. See tests/system/.
system-test: deb
	./tests/system/run.sh dist/elemta_$(VERSION)$(SUFFIX)_all.deb $(RELEASE)

# Tests driven from the host against $(DEBIAN)'s VM (default: both releases), the package as
# installed (tests/system/vmhost.py):
# - power-test: sends mail, kills qemu (SIGKILL) at random moments, boots again from the same
#   disk and checks that every message answered 250 is in the Maildir, intact, and nothing torn
#   is in new/. POWER_CUTS per release (default 5: 10 over both). See tests/system/power.py.
# - flood-test: 200 clients in DATA with 5-20 MiB messages plus a ballast in the unit's cgroup
#   under MemoryMax=384M: no OOM kill, 452 while critical, every 250 intact, recovery.
POWER_CUTS ?= 5
VM_RELEASES = $(if $(DEBIAN),$(DEBIAN),bookworm trixie)
power-test flood-test:
	@rc=0; for r in $(VM_RELEASES); do \
	    case $$r in trixie) s=+deb13 ;; *) s=+deb12 ;; esac; \
	    $(MAKE) --no-print-directory deb DEBIAN=$$r && \
	    if [ $@ = power-test ]; then \
	        ./tests/system/power.py dist/elemta_$(VERSION)$${s}_all.deb $$r --cuts $(POWER_CUTS); \
	    else \
	        ./tests/system/flood.py dist/elemta_$(VERSION)$${s}_all.deb $$r; \
	    fi || rc=1; \
	done; exit $$rc

clean:
	rm -rf $(VENV) build dist src/*.egg-info var
