# The front door. `make run` serves the demo (or configured) model on
# 127.0.0.1:8000; `make test` installs what the tests need and runs them all.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := var/demo-model
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install system-deps runtime-deps run test test-quick test-gpu test-load bench bench-real clean wheel wheelhouse lint deploy-test deploy-test-cluster deploy-test-vm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# setup.py builds the own int8 kernel (service/inference/_int8.c) in place; without a C compiler the install
# goes on and the int8 mode runs on torch's fbgemm kernel.
$(STAMP): pyproject.toml setup.py service/inference/_int8.c | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,deploy]'
	@$(BIN)/python -c 'import service.inference._int8' 2>/dev/null || echo "the own int8 kernel did not build \
	(is a C compiler, gcc, installed?): the int8 mode will run on torch's fbgemm kernel, which is slower at batch 1"
	touch $@

install: $(STAMP)

# OpenCV (through the OCR, rapidocr-onnxruntime) links libGL and GLib: Debian's
# libgl1 and libglib2.0-0, which a server or container image may lack.
OCR_LIBS_CHECK := { ldconfig -p | grep -q 'libGL\.so\.1 ' || missing="$$missing libgl1"; \
	ldconfig -p | grep -q 'libglib-2\.0\.so\.0 ' || missing="$$missing libglib2.0-0"; }

# What `make run` needs beyond Python: the OCR's system libraries.
runtime-deps:
	@missing=""; $(OCR_LIBS_CHECK); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing$$missing (documents read by OCR need them): install them as root"; fi; \
	fi

# Servers the tests run for real (nginx, redis-server, PostgreSQL), curl for the
# README's examples, and for the console's tests Debian's chromium with its
# driver and Node.js (the test OpenID provider, tests/oidc_op): installed when
# missing, only on Debian as root, without starting their packaged services
# (RUNLEVEL=1 makes invoke-rc.d skip them). A Node.js already there (with its
# npm) is kept: the provider needs Node 20 or later.
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	$(OCR_LIBS_CHECK); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing$$missing: install them (as root on Debian, make test does)"; exit 1; fi; \
	fi

$(DEMO)/config.json: | $(STAMP)
	$(BIN)/python -m service.demo_model $(DEMO)

ADMIN := $(BIN)/vibethinker-admin

# Serves VIBE_MODEL_PATH if set, else the demo model (random weights, gibberish).
# State (SQLite, signing keys) lives under ./var unless VIBE_* settings say otherwise.
run: install runtime-deps
	@if [ -z "$$VIBE_MODEL_PATH$$VIBE_CONFIG" ]; then $(MAKE) --no-print-directory $(DEMO)/config.json; fi
	@test -n "$$($(ADMIN) keys list)" || $(ADMIN) keys generate
	@$(ADMIN) --json users list | grep -q '"name": "admin"' || $(ADMIN) users add admin --admin
	@token=$$($(ADMIN) tokens issue admin --scope generate,admin --ttl 7d --label "make run" | tail -n 1); \
	  echo "a token for the local admin user (scopes generate, admin; 7 days):"; echo "export TOKEN=$$token"
	@echo "the admins' console: this link signs admin in, once, soon (vibethinker-admin console-link admin makes another):"
	@$(ADMIN) console-link admin | tail -n 1
	@echo "serving on http://$${VIBE_BIND:-127.0.0.1:8000} (Ctrl-C stops)"
	@echo "logs: this terminal, one JSON object per line on stderr"
	@echo "metrics: http://$${VIBE_BIND:-127.0.0.1:8000}/metrics (Prometheus text)"
	@if [ -z "$$VIBE_MODEL_PATH$$VIBE_CONFIG" ]; then export VIBE_MODEL_PATH="$(CURDIR)/$(DEMO)"; fi; \
	  exec $(BIN)/gunicorn -c service/gunicorn_conf.py "service.app:create_app()"

# Everything but the four-host cluster deployment (make deploy-test-cluster),
# whose loopback form (tests/test_cluster_http.py) is in.
# The console's test OpenID provider (npm's oidc-provider, pinned by its lock file).
OIDC_OP := tests/oidc_op/node_modules/.package-lock.json
$(OIDC_OP): tests/oidc_op/package-lock.json
	cd tests/oidc_op && npm ci --no-audit --no-fund --prefer-offline --loglevel=error

test: install system-deps $(OIDC_OP)
	$(BIN)/python -m pytest -m "not cluster"

# For quick loops: everything but the slow tests.
test-quick: install
	$(BIN)/python -m pytest -m "not slow" -x -q

# The GPU tests (tests/gpu): on a machine with a GPU and the CUDA build of torch in the venv.
test-gpu: install
	VIBE_TEST_GPU=1 $(BIN)/python -m pytest -q tests/gpu

# The full load test: 200 clients for 60 s of mixed traffic through nginx
# (make test runs the same test with 40 clients for 15 s).
test-load: install system-deps
	LOAD_CLIENTS=200 LOAD_SECONDS=60 $(BIN)/python -m pytest -q -s tests/test_load.py

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.refusals
	$(BIN)/python -m bench.modes
	$(BIN)/python -m bench.kernel
	$(BIN)/python -m bench.batches
	$(BIN)/python -m bench.prefill
	$(BIN)/python -m bench.prefixes --preset tiny
	$(BIN)/python -m bench.speculation --preset tiny --no-llama
	$(BIN)/python -m bench.cache
	$(BIN)/python -m bench.documents
	$(BIN)/python -m bench.slowclients

# Real size against llama.cpp (bench/realsize.py): builds llama.cpp under var/llama once (cmake and g++;
# minutes) and the 3.1 GB random-weight model under var/bench-model; then about 15 minutes, the decode
# speed deep into long answers (bench/depth.py) about 5 more, thinking that ends in time
# (bench/thinking.py) about 6, a long prompt joining running streams
# (bench/prefill.py) about 5, the prefix cache (bench/prefixes.py) about 4, and batch 1 with and without
# speculation against llama.cpp (bench/speculation.py) about 5.
bench-real: install
	@command -v cmake >/dev/null && command -v g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null; \
	  else echo "cmake and g++ are missing: install them"; exit 1; fi; }
	$(BIN)/python -m bench.realsize
	$(BIN)/python -m bench.depth
	$(BIN)/python -m bench.thinking
	$(BIN)/python -m bench.prefill --preset vibethinker-1.5b
	$(BIN)/python -m bench.prefixes
	$(BIN)/python -m bench.speculation

# What ansible/ deploys: the project wheel, and for offline servers a
# wheelhouse of every dependency (torch's CPU build included; TORCH_VARIANT=cuda
# for its CUDA build, app_torch_variant: cuda) for Debian 12's Python.
TORCH_VARIANT ?= cpu
wheel: install
	rm -rf dist/*.whl && $(BIN)/pip wheel -q --no-deps -w dist .
	@ls dist/*.whl

wheelhouse: wheel
	$(BIN)/python ansible/build_wheelhouse.py dist/vibethinker_service-*.whl dist/wheelhouse \
	  --torch-variant $(TORCH_VARIANT)

lint: install
	$(BIN)/ansible-lint
	$(BIN)/ansible-playbook -i ansible/inventory.example.ini ansible/site.yml --syntax-check

# Boots a Debian 12 host with systemd-nspawn (root) and deploys to it with
# ansible/site.yml; part of `make test` too.
deploy-test: install system-deps
	$(BIN)/python -m pytest tests/test_deploy.py

# A cluster (balancer, two app servers, state host) as four systemd-nspawn
# hosts on one private bridge, deployed by site.yml: about 11 minutes, which
# `make test` (about 35 already) leaves to this target.
deploy-test-cluster: install system-deps
	$(BIN)/python -m pytest tests/test_deploy_cluster.py

# The same scenario against a qemu VM with its own kernel. Software emulation
# here (no usable KVM): about an hour, so not part of `make test`.
deploy-test-vm: install system-deps
	VIBE_DEPLOY_HOST=vm $(BIN)/python -m pytest tests/test_deploy.py

clean:
	rm -rf $(VENV) var .pytest_cache
