# The two commands a newcomer needs on a fresh machine:
#   make demo   release build, then `svmemu demo` (the livelock, its fix, the overhead breakdown)
#   make test   the test suites (what CI runs)
# Both install libdrm-dev (and pkg-config) with apt-get when pkg-config cannot find libdrm.
# Also: make tsan (the suites under ThreadSanitizer), make docs (the DocC site
# of SVMEmu, warnings fail it), make cli-doc (Docs/cli.md's option tables), make bench (release benchmarks: every goal's figure). CI runs
# test, docs and tsan (.ci/run). make kernel-check runs the real-kernel rig
# (Tools/kernel-rig; not in CI, the first kernel build takes 8-30 minutes).

SWIFT ?= swift
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test tsan docs deps build release bench soak soak-sweep clean kernel-check cli-doc

deps:
	@if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists libdrm; then \
		echo "svmemu: installing libdrm-dev and pkg-config with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdrm-dev pkg-config >/dev/null; \
	fi

build: deps
	$(SWIFT) build --product svmemu

release: deps
	$(SWIFT) build -c release --product svmemu

demo: release
	.build/release/svmemu demo

test: deps
	$(SWIFT) test

# The suites under ThreadSanitizer, in their own build folder. The emulator's
# locks annotate what they order (SVM_TSAN); any report fails the run.
tsan: deps
	TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 $${TSAN_OPTIONS:-}" \
		$(SWIFT) test --sanitize=thread --scratch-path .build-tsan -Xcc -DSVM_TSAN

# The DocC site of SVMEmu (Sources/SVMEmu/SVMEmu.docc with the API), built
# by swift-docc-plugin in its own build folder so that the debug build stays
# valid. Any DocC warning (an unresolved symbol link, a parameter documented
# that does not exist) fails it. Output: .build-docs/site; browse it with
#   swift package --disable-sandbox preview-documentation --target SVMEmu
DOCS_OUT := .build-docs/site
docs:
	$(SWIFT) package --scratch-path .build-docs --allow-writing-to-directory $(DOCS_OUT) \
		generate-documentation --target SVMEmu --warnings-as-errors --output-path $(DOCS_OUT)
	@echo "docs: $(DOCS_OUT) (open documentation/svmemu in a static web server, or use preview-documentation)"

# Docs/cli.md's tables of every option of every command, from the binary's own
# help (after adding or renaming an option; a test checks that none is missing).
cli-doc: build
	python3 Tools/cli-options.py .build/debug/svmemu Docs/cli.md

# The randomized soak under the deterministic scheduler (Docs/deterministic.md):
# a short one by default for CI; `make soak SOAK_OPERATIONS=10000000` for the goal.
# Every operation, fork included (about 26 s in release on the 2-core machine).
SOAK_OPERATIONS ?= 1000000
SOAK_MIX ?= all
soak: release
	.build/release/svmemu soak --operations $(SOAK_OPERATIONS) --mix $(SOAK_MIX) --check-tlb

# Seeds 1-16, 300,000 operations each, an audit every 1,000 operations,
# the stale-entry checker on: every seed must come back clean (0 warnings,
# 0 lock-order cycles, 0 corrupted bytes, 0 leaks). SOAK_SEEDS (a range A-B)
# and SOAK_SWEEP_OPERATIONS change the sweep; SOAK_SHARDS=N runs it as N
# shards with GNU parallel (Debian's `parallel`), merged by `svmemu merge`
# (Docs/sharding.md). The first failing seed is printed with its replay command.
SOAK_SEEDS ?= 1-16
SOAK_SWEEP_OPERATIONS ?= 300000
SOAK_SHARDS ?= 1
SOAK_SWEEP_ARGS = --seeds $(SOAK_SEEDS) --operations $(SOAK_SWEEP_OPERATIONS) --audit-every 1000 --check-tlb
soak-sweep: release
	@if [ "$(SOAK_SHARDS)" = 1 ]; then \
		.build/release/svmemu soak $(SOAK_SWEEP_ARGS); \
	else \
		command -v parallel >/dev/null || { echo "soak-sweep: SOAK_SHARDS needs GNU parallel (apt-get install parallel)"; exit 1; }; \
		seq 1 $(SOAK_SHARDS) | parallel --line-buffer -j $(SOAK_SHARDS) \
			.build/release/svmemu soak $(SOAK_SWEEP_ARGS) --shard {}/$(SOAK_SHARDS) \
			| .build/release/svmemu merge; \
	fi

# Every figure of the speed-and-scale goals beside its goal, then one table
# (Docs/benchmarks.md): about two minutes; BENCH_FULL=1 measures overhead at
# 64M and a 1,000,000-operation soak, as the goals are stated (about ten).
BENCH_FULL ?=
bench: release
	.build/release/svmemu bench goals $(if $(BENCH_FULL),--full)

clean:
	rm -rf .build .build-docs

# The real-kernel rig (Tools/kernel-rig/README.md): Debian's linux-source-6.12
# pinned to 6.12.117, three kernels (vanilla, test_hmm knobs, + the trylock
# backport) under QEMU TCG with 2 vCPUs: hmm-tests, the livelock cases over
# KERNEL_BOOTS boots, the calibration program. Writes Data/kernel/livelock.json,
# Data/kernel/hmm-tests.tap and Data/profiles/qemu-tcg-2.json. Not in CI: the
# first kernel build takes 8-30 minutes here; later runs reuse .build-kernel/.
KERNEL_BOOTS ?= 3
.PHONY: kernel-check
kernel-check:
	BOOTS=$(KERNEL_BOOTS) Tools/kernel-rig/rig.sh check
